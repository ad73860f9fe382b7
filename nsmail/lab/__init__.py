"""The embedded receiving side of ``nsmail demo``: a lab DNS server and a judging SMTP receiver.

Security: test and demo infrastructure; see each module for what it trusts.
"""

from .dnsserver import DnsServer
from .receiver import Receiver, Verdict
from .serving import Endpoint, parse_endpoint

__all__ = ["DnsServer", "Endpoint", "Receiver", "Verdict", "parse_endpoint"]
