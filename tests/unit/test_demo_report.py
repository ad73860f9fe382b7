"""`nsmail demo`'s pure parts: the configuration and records it writes, and its report
(the command itself, as root, is tests/e2e/test_demo.py's)."""

from __future__ import annotations

from configs import tree

from nsmail.core.config import Account, SystemLookup, parse
from nsmail.lab import demo, scenario
from nsmail.lab.dnsserver import load


def test_the_config_and_the_records_are_valid() -> None:
    tmp = demo.TEMP_PARENT / f"{demo.TEMP_PREFIX}x"
    uids = [61000, 61001, 61002]
    homes = {
        str(scenario.home_of(tmp, t)): uid for t, uid in zip(scenario.TENANTS, uids, strict=True)
    }
    lookup = SystemLookup(
        user=lambda name: Account(998 if name == "nsmail-dns" else 999, 999, "/nonexistent"),
        lstat=tree(homes),
        default_resolvers=lambda: (),
    )
    config = parse([("nsmail.toml", scenario.config_text(tmp, scenario.TENANTS, uids))], lookup)
    assert [t.domain for t in config.tenants] == ["bcd.test", "cde.test", "def.test"]
    assert [t.uid for t in config.tenants] == uids
    assert config.network.prefix == "demo"
    load(scenario.dns_records(scenario.TENANTS))  # raises for a malformed record


def test_the_table_fits_100_columns_even_with_refusals() -> None:
    naive = {
        "accepted": False,
        "verified": "abc.test",
        "reason": "550 5.7.1 HELO name bcd.test is not the client name abc.test",
    }
    sent = {
        "accepted": True,
        "verified": "bcd.test",
        "received": "from bcd.test (bcd.test [IPv6:2001:db8:51::70])",
    }
    row = scenario.tenant_report(scenario.TENANTS[0], naive, sent)
    assert row["nsmail"]["clean"] and row["naive"]["refused"].startswith("550 ")
    table = scenario.render_comparison([row])
    assert max(len(line) for line in table.splitlines()) <= 100
    assert "not the client name abc.test" in table
