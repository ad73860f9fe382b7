"""Code that runs with a tenant's rights: its jailed delivery worker, and reading its queue.

Runs as the tenant's uid, no capabilities (the worker in its namespace and chroot); it trusts
neither the tenant's queue files nor the remote servers it talks to.
"""
