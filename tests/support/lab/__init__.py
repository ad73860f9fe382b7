"""A real receiving side for end-to-end tests: namespaces, NSD and a strict Postfix.

Use it as ``from lab import Lab, Nsd, Postfix, forward_and_reverse`` (tests/support is
on sys.path). The network, its addresses and names are ``nsmail.lab.topology``'s, the one
the demo builds too; ``topology`` here gives each test its own, ``dns``, ``postfix`` and
``unbound`` (validating a signed NSD, for the TLS policy tests) are the servers.
Everything needs root.

Security: test infrastructure, runs as root; creates only prefixed namespaces and
documentation addresses inside them.
"""

from nsmail.lab.dnsserver import Record, forward_and_reverse, reverse_name
from nsmail.lab.topology import (
    BRIDGE,
    BRIDGE_V4,
    BRIDGE_V6,
    DNS_V4,
    DNS_V6,
    HOST_NAME,
    HOST_V4,
    HOST_V6,
    MX_V4,
    MX_V6,
    TENANT_SUBNET4,
    TENANT_SUBNET6,
    UPLINK,
    lab_records,
)

from .dns import Nsd
from .postfix import DEFAULT_RECIPIENT_STATUS, DOMAINS, Postfix
from .topology import Lab, LabError, sweep_dead_labs
from .unbound import Unbound

__all__ = [
    "BRIDGE",
    "BRIDGE_V4",
    "BRIDGE_V6",
    "DEFAULT_RECIPIENT_STATUS",
    "DNS_V4",
    "DNS_V6",
    "DOMAINS",
    "HOST_NAME",
    "HOST_V4",
    "HOST_V6",
    "MX_V4",
    "MX_V6",
    "TENANT_SUBNET4",
    "TENANT_SUBNET6",
    "UPLINK",
    "Lab",
    "LabError",
    "Nsd",
    "Postfix",
    "Record",
    "Unbound",
    "forward_and_reverse",
    "lab_records",
    "reverse_name",
    "sweep_dead_labs",
]
