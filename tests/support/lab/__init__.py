"""A real receiving side for end-to-end tests: namespaces, NSD and a strict Postfix.

Use it as ``from lab import Lab, Nsd, Postfix, forward_and_reverse`` (tests/support is
on sys.path). See ``topology`` for the network layout, ``dns`` and ``postfix`` for the
servers. Everything needs root.

Security: test infrastructure, runs as root; creates only prefixed namespaces and
documentation addresses inside them.
"""

from .dns import Nsd, Record, forward_and_reverse, reverse_name
from .postfix import DEFAULT_RECIPIENT_STATUS, DOMAINS, Postfix
from .topology import (
    BRIDGE,
    BRIDGE_V4,
    BRIDGE_V6,
    DNS_V4,
    DNS_V6,
    HOST_V4,
    HOST_V6,
    MX_V4,
    MX_V6,
    UPLINK,
    Lab,
    LabError,
    sweep_dead_labs,
)

__all__ = [
    "BRIDGE",
    "BRIDGE_V4",
    "BRIDGE_V6",
    "DEFAULT_RECIPIENT_STATUS",
    "DNS_V4",
    "DNS_V6",
    "DOMAINS",
    "HOST_V4",
    "HOST_V6",
    "MX_V4",
    "MX_V6",
    "UPLINK",
    "Lab",
    "LabError",
    "Nsd",
    "Postfix",
    "Record",
    "forward_and_reverse",
    "reverse_name",
    "sweep_dead_labs",
]
