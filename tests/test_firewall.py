"""nsmail's nftables table: the rendered text, `nft` applying it, and HostNetwork keeping it.

The rendering is checked as text; everything that runs nft does so in a lab namespace,
never in the machine's own.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
from hosting import DUAL, THREE, V4_ONLY, V6_ONLY, Hosting
from lab import Lab

from nsmail import firewall, nft
from nsmail.config import Config, Tenant, load
from nsmail.netns import NETNS_DIR, HostNetwork, inside

A4, B4 = ip_address("198.51.100.70"), ip_address("198.51.100.71")
A6, B6 = ip_address("2001:db8:51::70"), ip_address("2001:db8:51::72")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# -- the rendered text ---------------------------------------------------------------


def test_the_table_replaces_any_of_its_name_and_holds_each_family_in_its_set() -> None:
    lines = firewall.table(frozenset({B4, A6, A4})).splitlines()
    # Declared (so that it exists), deleted and made afresh: one transaction, no gap.
    assert lines[:3] == ["table inet nsmail {}", "delete table inet nsmail", "table inet nsmail {"]
    assert _set_block(lines, "tenants4") == [
        "type ipv4_addr",
        "elements = { 198.51.100.70, 198.51.100.71 }",
    ]
    assert _set_block(lines, "tenants6") == ["type ipv6_addr", "elements = { 2001:db8:51::70 }"]
    chain = lines[lines.index("\tchain from_tenants {") :]
    assert [line.strip() for line in chain[1:6]] == [
        "type filter hook input priority filter; policy accept;",
        "ip6 saddr @tenants6 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }"
        " ip6 hoplimit 255 accept",
        "ip saddr @tenants4 reject with icmpx admin-prohibited",
        "ip6 saddr @tenants6 reject with icmpx admin-prohibited",
        "}",
    ]
    assert lines[-1] == "}"


def test_an_empty_set_lists_no_elements() -> None:
    # nft refuses `elements = { }`.
    lines = firewall.table(frozenset({A4})).splitlines()
    assert _set_block(lines, "tenants6") == ["type ipv6_addr"]


def _set_block(lines: list[str], name: str) -> list[str]:
    start = lines.index(f"\tset {name} {{") + 1
    return [line.strip() for line in lines[start : lines.index("\t}", start)]]


def test_changes_add_and_delete_only_the_difference() -> None:
    assert firewall.changes(frozenset({A4, A6}), frozenset({A4, B4, B6})).splitlines() == [
        "add element inet nsmail tenants4 { 198.51.100.71 }",
        "add element inet nsmail tenants6 { 2001:db8:51::72 }",
        "delete element inet nsmail tenants6 { 2001:db8:51::70 }",
    ]
    assert firewall.changes(frozenset({A4, A6}), frozenset({A6, A4})) == ""


def test_the_deletion_works_whether_or_not_the_table_exists() -> None:
    assert firewall.deletion() == "table inet nsmail {}\ndelete table inet nsmail\n"


# -- nft applying it -----------------------------------------------------------------


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with Lab() as lab:
        yield lab


def sets(lab: Lab, namespace: str | None = None) -> dict[str, set[str]] | None:
    """The members of each set of the table in `namespace` (the lab's host), or None."""
    listing = lab.run(
        namespace or lab.host, ["nft", "-j", "list", "table", "inet", "nsmail"], check=False
    )
    if listing.returncode != 0:
        return None
    found = {}
    for entry in json.loads(listing.stdout)["nftables"]:
        if "set" in entry:
            found[entry["set"]["name"]] = set(entry["set"].get("elem", []))
    return found


def in_host(lab: Lab, text: str) -> None:
    with inside(NETNS_DIR / lab.host):
        nft.apply(text)


@needs_root
def test_nft_applies_the_table_and_its_changes(lab: Lab) -> None:
    in_host(lab, firewall.table(frozenset({A4, A6})))
    assert sets(lab) == {"tenants4": {"198.51.100.70"}, "tenants6": {"2001:db8:51::70"}}
    in_host(lab, firewall.changes(frozenset({A4, A6}), frozenset({A4, B4, B6})))
    assert sets(lab) == {
        "tenants4": {"198.51.100.70", "198.51.100.71"},
        "tenants6": {"2001:db8:51::72"},
    }
    in_host(lab, firewall.table(frozenset({B6})))  # replaced, not merged
    assert sets(lab) == {"tenants4": set(), "tenants6": {"2001:db8:51::72"}}
    for _ in range(2):
        in_host(lab, firewall.deletion())
        assert sets(lab) is None


@needs_root
def test_a_refused_change_applies_nothing_and_says_why_in_one_line(lab: Lab) -> None:
    in_host(lab, firewall.table(frozenset({A4})))
    # The first line would add B4 on its own; the second cannot be applied.
    with pytest.raises(nft.NftError) as refused:
        in_host(lab, firewall.changes(frozenset({A6}), frozenset({B4})))
    assert str(refused.value).startswith("nft: /dev/stdin:2:")
    assert str(refused.value).endswith("Error: Could not process rule: No such file or directory")
    assert sets(lab) == {"tenants4": {"198.51.100.70"}, "tenants6": set()}
    in_host(lab, firewall.deletion())


def test_a_missing_nft_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(nft.NftError, match=r"^nft not found: install the nftables package$"):
        nft.apply(firewall.deletion())


# -- HostNetwork keeping it ----------------------------------------------------------


@pytest.fixture(scope="module")
def config(lab: Lab) -> Config:
    return load(Hosting(lab).write_config(THREE))


def tenant(config: Config, domain: str) -> Tenant:
    found = config.tenant(domain)
    assert found is not None
    return found


def host_network(lab: Lab, config: Config) -> HostNetwork:
    with inside(NETNS_DIR / lab.host):
        return HostNetwork(config.network)


@needs_root
def test_the_table_follows_the_tenants_in_the_host_namespace_only(lab: Lab, config: Config) -> None:
    host = host_network(lab, config)
    assert sets(lab) is None  # made with the first tenant
    dual = host.create(tenant(config, DUAL.domain))
    v4 = host.create(tenant(config, V4_ONLY.domain))
    assert sets(lab) == {
        "tenants4": {"198.51.100.70", "198.51.100.71"},
        "tenants6": {"2001:db8:51::70"},
    }
    # This process runs in the machine's own namespace: nothing landed there.
    assert subprocess.run(["nft", "list", "table", "inet", "nsmail"], check=False).returncode
    # A removed tenant's addresses leave with the next change (see HostNetwork).
    host.remove(dual)
    assert sets(lab) == {
        "tenants4": {"198.51.100.70", "198.51.100.71"},
        "tenants6": {"2001:db8:51::70"},
    }
    v6 = host.create(tenant(config, V6_ONLY.domain))
    assert sets(lab) == {"tenants4": {"198.51.100.71"}, "tenants6": {"2001:db8:51::72"}}
    host.remove(v4)
    host.remove(v6)
    host.close()
    assert sets(lab) is None


@needs_root
def test_a_table_taken_away_is_made_again_whole(lab: Lab, config: Config) -> None:
    host = host_network(lab, config)
    dual = host.create(tenant(config, DUAL.domain))
    lab.run(lab.host, ["nft", "flush", "ruleset"])  # as nftables.service does when it starts
    v4 = host.create(tenant(config, V4_ONLY.domain))
    assert sets(lab) == {
        "tenants4": {"198.51.100.70", "198.51.100.71"},
        "tenants6": {"2001:db8:51::70"},
    }
    host.remove(dual)
    host.remove(v4)
    host.close()


@needs_root
def test_an_earlier_runs_table_is_removed_as_stale(lab: Lab, config: Config) -> None:
    in_host(lab, firewall.table(frozenset({A4})))
    host = host_network(lab, config)
    host.remove_stale()
    assert sets(lab) is None
    host.close()


@needs_root
def test_without_nft_no_tenant_is_built(
    lab: Lab,
    config: Config,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = host_network(lab, config)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(OSError, match=r"^nft not found: install the nftables package$"):
        host.create(tenant(config, DUAL.domain))
    assert not host.names(tenant(config, DUAL.domain)).path.exists()
    # Removing what is not there only warns: a table left behind would only block.
    with caplog.at_level(logging.WARNING, logger="nsmail.netns"):
        host.remove_stale()
    assert caplog.messages == [
        "cannot remove the firewall table left by an earlier run:"
        " nft not found: install the nftables package"
    ]
    host.close()
