"""Code that runs as the tenant, inside its namespace and chroot, with no capabilities.

It trusts neither the tenant's queue files nor the remote servers it talks to.
"""
