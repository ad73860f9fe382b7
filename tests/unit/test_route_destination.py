"""Destinations by TLS policy: a session opened for less is never used for more."""

from __future__ import annotations

from nsmail.core.tlspolicy import TlsPolicy
from nsmail.tenant.policies import MAY, Demand
from nsmail.tenant.remote import Route

HOSTS = ("mx1.rcpt.test", "mx2.rcpt.test")


def destination(*demands: Demand, family: str = "any") -> str:
    return Route("rcpt.test", HOSTS, False, demands, family).destination


def test_opportunistic_routes_to_the_same_hosts_share_a_destination() -> None:
    assert destination(MAY, MAY) == "mx1.rcpt.test,mx2.rcpt.test"
    assert destination(MAY, MAY, family="ipv4") == "mx1.rcpt.test,mx2.rcpt.test/ipv4"


def test_each_set_of_policies_is_a_destination_of_its_own() -> None:
    sts = Demand(TlsPolicy.MTA_STS)
    dane = Demand(TlsPolicy.DANE)
    assert destination(sts, sts) == "mx1.rcpt.test,mx2.rcpt.test/mta-sts"
    assert destination(dane, sts) == "mx1.rcpt.test,mx2.rcpt.test/dane+mta-sts"
    testing = Demand(TlsPolicy.MTA_STS_TESTING)
    assert destination(testing, testing) == "mx1.rcpt.test,mx2.rcpt.test/mta-sts-testing"


def test_a_host_a_policy_forbids_is_marked() -> None:
    forbidden = Demand(TlsPolicy.MTA_STS, problem="not an MX host of its policy")
    sts = Demand(TlsPolicy.MTA_STS)
    # Another domain served by mx1 whose policy allows it must not take this session.
    assert destination(forbidden, sts) == "!mx1.rcpt.test,mx2.rcpt.test/mta-sts"
    # In testing mode the host is used all the same: nothing to keep apart.
    testing = Demand(TlsPolicy.MTA_STS_TESTING, problem="not an MX host of its policy")
    assert destination(testing, testing) == "mx1.rcpt.test,mx2.rcpt.test/mta-sts-testing"
