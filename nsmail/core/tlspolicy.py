"""The TLS policies that may govern a delivery session, by the names log lines, status
reports and metrics give them."""

from __future__ import annotations

from enum import StrEnum


class TlsPolicy(StrEnum):
    """What governs a session's TLS; a log line's `tls=` when it demands more than `may`."""

    MAY = "may"  # opportunistic (RFC 7435): whatever the server offers
    VERIFIED = "verified"  # the operator's `tls = "verify"`: a certificate valid for the host
    DANE = "dane"  # the host's TLSA records (RFC 7672)
    MTA_STS = "mta-sts"  # the domain's MTA-STS policy in enforce mode (RFC 8461)
    MTA_STS_TESTING = "mta-sts-testing"  # ... in testing mode: failures only reported


# The policies that demand something, and can so fail: status and metrics count per each.
DEMANDING = tuple(p for p in TlsPolicy if p is not TlsPolicy.MAY)
