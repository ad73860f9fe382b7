"""The embedded receiving side of ``nsmail demo``: a lab DNS server and a judging SMTP receiver.

Run by root for the demo and the tests, in network namespaces of their own; test and demo
infrastructure, it trusts the lab it builds (see each module for what it receives).
"""

from .dnsserver import DnsServer
from .receiver import Receiver, Verdict
from .serving import Endpoint, parse_endpoint

__all__ = ["DnsServer", "Endpoint", "Receiver", "Verdict", "parse_endpoint"]
