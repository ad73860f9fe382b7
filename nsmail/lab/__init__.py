"""The lab of `nsmail demo` and the tests: one network topology, a DNS server, a judging MTA.

Run as root by the demo and the tests, only inside namespaces of their own; the servers trust
their records and nothing the network sends (see each module for what it trusts).
"""

from .dnsserver import DnsServer
from .receiver import Receiver, Verdict
from .serving import Endpoint, parse_endpoint

__all__ = ["DnsServer", "Endpoint", "Receiver", "Verdict", "parse_endpoint"]
