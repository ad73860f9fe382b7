"""nsmail's nftables table as text (nsmail.core.firewall): what nft is given."""

from __future__ import annotations

from ipaddress import ip_address

from nsmail.core import firewall

A4, B4 = ip_address("198.51.100.70"), ip_address("198.51.100.71")
A6, B6 = ip_address("2001:db8:51::70"), ip_address("2001:db8:51::72")


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
