"""nsmail.core.addresses: splitting a mailbox, qualifying one, comparing domains."""

from __future__ import annotations

from nsmail.core.addresses import in_domain, same_domain, split, with_domain


def test_split_at_the_last_at_sign() -> None:
    assert split("alice@bcd.test") == ("alice", "bcd.test")
    assert split('"a@b"@bcd.test') == ('"a@b"', "bcd.test")  # a quoted local part
    assert split("alice") == ("alice", "")
    assert split("alice@") == ("alice", "")
    assert split("@bcd.test") == ("", "bcd.test")


def test_with_domain_qualifies_only_a_bare_local_part() -> None:
    assert with_domain("alice", "bcd.test") == "alice@bcd.test"
    assert with_domain("alice@cde.test", "bcd.test") == "alice@cde.test"


def test_domains_compare_without_case_or_the_roots_dot() -> None:
    assert same_domain("BCD.test", "bcd.TEST")
    assert same_domain("bcd.test.", "bcd.test")
    assert not same_domain("bcd.test", "cde.test")
    assert not same_domain("bcd.test", "mail.bcd.test")


def test_in_domain_takes_the_domain_and_the_names_below_it() -> None:
    assert in_domain("bcd.test", "bcd.test")
    assert in_domain("Mail.BCD.test.", "bcd.test")
    assert not in_domain("xbcd.test", "bcd.test")  # a label boundary, not a suffix
    assert not in_domain("test", "bcd.test")
    assert not in_domain("bcd.test", "")
