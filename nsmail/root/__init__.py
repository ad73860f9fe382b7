"""Root-only code that touches the kernel: namespaces, links, the jail, the supervisor.

Runs as root in the host namespace; it trusts its configuration and nothing a tenant
writes: what workers say reaches it only as bounded, validated reports.
"""
