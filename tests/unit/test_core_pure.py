"""Pure pieces of the root side: jail verification, restart back-off, names, status table."""

from __future__ import annotations

from nsmail.core.retry import restart_delay
from nsmail.core.status import RelayStatus, ReloadRefusal, WorkerStatus, render_table
from nsmail.root import metrics
from nsmail.root.jail import check_status
from nsmail.root.netns import names_for
from nsmail.root.supervisor import RESTARTS

JAILED = """Name:\tnsmail bcd.test
Uid:\t20001\t20001\t20001\t20001
Gid:\t20002\t20002\t20002\t20002
Groups:\t
NoNewPrivs:\t1
CapInh:\t0000000000000000
CapPrm:\t0000000000000000
CapEff:\t0000000000000000
CapBnd:\t0000000000000000
CapAmb:\t0000000000000000
"""


def test_a_properly_jailed_status_passes() -> None:
    assert check_status(JAILED, 20001, 20002) == []


def test_effective_only_uid_change_is_caught() -> None:
    # The seed design's flaw: only the effective uid changed, root can come back.
    status = JAILED.replace("Uid:\t20001\t20001\t20001", "Uid:\t0\t20001\t0")
    assert check_status(status, 20001, 20002) == ["Uid is '0\\t20001\\t0\\t20001'"]


def test_every_leftover_privilege_is_named() -> None:
    status = (
        JAILED.replace("Groups:\t", "Groups:\t0 27")
        .replace("NoNewPrivs:\t1", "NoNewPrivs:\t0")
        .replace("CapBnd:\t0000000000000000", "CapBnd:\t000001ffffffffff")
        .replace("CapAmb:\t0000000000000000\n", "")
    )
    problems = check_status(status, 20001, 20002)
    assert [p.split()[0] for p in problems] == ["Groups", "NoNewPrivs", "CapBnd", "CapAmb"]


def test_garbage_status_fails_closed() -> None:
    assert len(check_status("nonsense", 1, 1)) == 9


def test_restart_delay_grows_and_is_capped() -> None:
    assert [restart_delay(RESTARTS, n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_names_fit_the_kernel_limits() -> None:
    names = names_for("abcde", "a-very-long-tenant-domain-name.example.test")
    assert names.namespace == "abcde-a-very-long-tenant-domain-name.example.test"
    assert len(names.host_ifname) <= 15
    assert names_for("nsm", "bcd.test") != names_for("nsm", "cde.test")
    assert names_for("nsm", "bcd.test") == names_for("nsm", "bcd.test")


def test_status_table_fits_80_columns() -> None:
    record = WorkerStatus(
        domain="a-rather-long-hosted-domain-name.test",
        role="tenant",
        namespace="nsm-a-rather-long-hosted-domain-name.test",
        pid=4194304,
        uid=1000000,
        state="starting",
        ipv4="198.51.100.170",
        ipv6="2001:db8:51:ffff:ffff:ffff:ffff:ffff",
        restarts=123,
        started=0.0,
        queue={
            "maildrop": 0,
            "incoming": 1,
            "active": 1,
            "deferred": 99999,
            "hold": 7,
            "corrupt": 1,
        },
        total={"sent": 10**9, "deferred": 10**9, "bounced": 10**9},
        hour={"sent": 10**6, "deferred": 10**6, "bounced": 10**6},
        last_error="worker 4194304 killed by SIGKILL " * 5,
        last_error_at=0.0,
        last_delivery_at=None,
        refused_reports=0,
        latency_counts=None,
        latency_sum=None,
    )
    table = render_table([record], now=200000.0)
    assert "a-rather-long-hoste~" in table
    assert all(len(line) <= 80 for line in table.splitlines())


def test_status_and_metrics_show_sessions_and_destinations_held_back() -> None:
    held_back = [
        {"name": "mx1.typo.test,mx2.typo.test", "state": "dead", "until": 1090.0},
        {"name": "aspmx.l.google.test", "state": "throttled", "until": 1030.0},
    ]
    record = WorkerStatus(
        **{
            **{f: None for f in WorkerStatus.__dataclass_fields__},
            "domain": "bcd.test",
            "role": "tenant",
            "uid": 61000,
            "state": "delivering",
            "restarts": 0,
            "refused_reports": 0,
            "sessions": 12,
            "destinations": held_back,
        }
    )
    lines = render_table([record], now=1000.0).splitlines()
    assert "12 sessions" in lines[2]
    assert lines[3:5] == [
        "  dead for 1m30s: mx1.typo.test,mx2.typo.test",
        "  throttled for 0m30s: aspmx.l.google.test",
    ]
    page = metrics.render([record]).decode()
    assert 'nsmail_smtp_sessions{tenant="bcd.test"} 12.0' in page
    assert 'nsmail_destinations_held_back{state="dead",tenant="bcd.test"} 1.0' in page


def test_status_and_metrics_count_tls_failures_per_policy() -> None:
    record = WorkerStatus(
        **{
            **{f: None for f in WorkerStatus.__dataclass_fields__},
            "domain": "bcd.test",
            "role": "tenant",
            "uid": 61000,
            "state": "delivering",
            "restarts": 0,
            "refused_reports": 0,
            "tls_failures": {"verified": 0, "dane": 2, "mta-sts": 1, "mta-sts-testing": 0},
        }
    )
    lines = render_table([record], now=1000.0).splitlines()
    assert lines[3] == "  TLS policy failures: dane 2, mta-sts 1"
    page = metrics.render([record]).decode()
    assert 'nsmail_tls_failures_total{policy="dane",tenant="bcd.test"} 2.0' in page
    assert 'nsmail_tls_failures_total{policy="verified",tenant="bcd.test"} 0.0' in page


def test_status_and_metrics_count_double_bounces() -> None:
    record = WorkerStatus(
        **{
            **{f: None for f in WorkerStatus.__dataclass_fields__},
            "domain": "bcd.test",
            "role": "tenant",
            "uid": 61000,
            "state": "idle",
            "restarts": 0,
            "refused_reports": 0,
            "queue": {"hold": 1},
            "double_bounces": 2,
        }
    )
    lines = render_table([record], now=1000.0).splitlines()
    assert lines[3] == "  1 held, 2 double bounces (told the postmaster)"
    page = metrics.render([record]).decode()
    assert 'nsmail_double_bounces_total{tenant="bcd.test"} 2.0' in page


def test_status_table_shows_a_refused_reload_and_the_relay() -> None:
    relay = RelayStatus(
        pid=4194303,
        state="restarting",
        started=None,
        restarts=2,
        last_error="did not answer a ping within 3 s " * 4,
        last_error_at=100.0,
    )
    refusal = ReloadRefusal("/etc/nsmail/nsmail.toml: host.colour: unknown key " * 3, 80.0)
    lines = render_table([], now=200.0, relay=relay, refusal=refusal).splitlines()
    assert lines[1] == "! reload refused 2m00s ago, the old configuration runs:"
    assert " ".join(line.strip() for line in lines[2:4]) == refusal.error.strip()
    assert lines[4].split() == ["(dns", "relay)", "-", "4194303", "restarting", "-", "2"]
    assert lines[5].startswith("  last error: did not answer a ping within 3 s")
    assert all(len(line) <= 80 for line in lines)
    assert RelayStatus.from_json(relay.to_json()) == relay
    assert ReloadRefusal.from_json(refusal.to_json()) == refusal
