"""nsmail's nftables table: `nft` applying it, and HostNetwork keeping it.

The rendered text alone is tests/unit/test_firewall_rules.py's; everything here runs nft
in a lab namespace, never in the machine's own.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
from firewall_sets import sets
from hosting import DUAL, THREE, V4_ONLY, V6_ONLY, Hosting
from lab import Lab

from nsmail.core import firewall
from nsmail.core.config import Config, Tenant
from nsmail.host.configfile import load
from nsmail.root import nft
from nsmail.root.netns import NETNS_DIR, HostNetwork
from nsmail.root.setns import inside

A4, B4 = ip_address("198.51.100.70"), ip_address("198.51.100.71")
A6, B6 = ip_address("2001:db8:51::70"), ip_address("2001:db8:51::72")


# -- nft applying it -----------------------------------------------------------------


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def in_host(lab: Lab, text: str) -> None:
    with inside(NETNS_DIR / lab.host):
        nft.apply(text)


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


def test_an_earlier_runs_table_is_removed_as_stale(lab: Lab, config: Config) -> None:
    in_host(lab, firewall.table(frozenset({A4})))
    host = host_network(lab, config)
    host.remove_stale()
    assert sets(lab) is None
    host.close()


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
    with caplog.at_level(logging.WARNING, logger="nsmail.root.netns"):
        host.remove_stale()
    assert caplog.messages == [
        "cannot remove the firewall table left by an earlier run:"
        " nft not found: install the nftables package"
    ]
    host.close()
