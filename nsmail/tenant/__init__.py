"""Code that runs with a tenant's rights: its jailed delivery worker, and reading its queue.

Runs as the tenant (the worker jailed after a root-only prepare, the queue tools as the queue's
owner); it trusts neither the tenant's queue files nor the remote servers it talks to.
"""
