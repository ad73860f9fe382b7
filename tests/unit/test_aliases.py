"""Aliases and .forward files (nsmail.core.aliases): the usual syntax, and where a local
name's mail goes, for users, aliases, .forward files, loops and what nsmail refuses."""

from __future__ import annotations

import pytest

from nsmail.core.aliases import (
    MAX_DEPTH,
    MAX_TARGETS,
    Book,
    Delivery,
    Forward,
    Problem,
    Undeliverable,
    parse_aliases,
    parse_forward,
    resolve,
)

USERS = {"alice": "alice", "bob": "bob", "root": "root"}


def book(aliases: dict[str, tuple[str, ...]], forwards: dict[str, Forward] | None = None) -> Book:
    return Book(
        domain="bcd.test",
        aliases=aliases,
        mailbox=lambda name: USERS.get(name.lower()),
        forward=lambda user: (forwards or {}).get(user),
    )


def test_the_usual_syntax() -> None:
    text = (
        "# comments and blank lines\n"
        "\n"
        "Root: alice, \\root\n"
        "staff: alice,\n"
        "  bob , ops@example.org\n"
        'quoted: "|/usr/bin/x, with a comma" /var/log/mail\n'
        "abuse: :include:/etc/mail/abuse\n"
    )
    parsed = parse_aliases(text, known=USERS.__contains__)
    assert parsed.table == (
        ("root", ("alice", "\\root")),
        ("staff", ("alice", "bob", "ops@example.org")),
        ("quoted", ("|/usr/bin/x, with a comma", "/var/log/mail")),
        ("abuse", (":include:/etc/mail/abuse",)),
    )
    assert parsed.problems == (
        Problem(6, "'|/usr/bin/x, with a comma' is a command: " + REFUSAL),
        Problem(6, "'/var/log/mail' is a file: " + REFUSAL),
        Problem(7, "':include:/etc/mail/abuse' is an :include: list: " + REFUSAL),
    )


REFUSAL = "nsmail delivers no mail to commands, files or :include: lists"


def test_lines_that_cannot_be_used_are_problems_and_the_first_entry_counts() -> None:
    parsed = parse_aliases("no colon here\nempty:\na: alice\nA: bob\nb: nobody\n  c@x.test\n")
    assert parsed.table == (("a", ("alice",)), ("b", ("nobody", "c@x.test")))
    assert parsed.problems == (
        Problem(1, "not 'name: target, ...'"),
        Problem(2, "'empty' has no target"),
        Problem(3, "'alice' is neither a user nor an alias"),
        Problem(4, "'A' again: the entry of line 3 counts"),
        Problem(5, "'nobody' is neither a user nor an alias"),
    )


def test_a_forward_file() -> None:
    text = "# mine\nalice@elsewhere.test, \\bob\n\n  copy@x.test\n"
    assert parse_forward(text) == ("alice@elsewhere.test", "\\bob", "copy@x.test")


def test_a_user_is_its_own_mailbox_and_an_unknown_name_bounces_as_before() -> None:
    assert resolve("Alice", book({})) == Delivery(("alice",), ())
    assert resolve("nobody", book({})) == Undeliverable(False, "5.1.1 no such user here")


def test_an_alias_wins_over_a_user_and_reaches_users_and_addresses() -> None:
    aliases = {
        "alice": ("bob", "alice", "x@example.org"),  # alice keeps a copy
        "info": ("alice@BCD.test", "sales"),
        "sales": ("y@example.org", "x@example.org"),
    }
    assert resolve("info", book(aliases)) == Delivery(
        ("bob", "alice"), ("x@example.org", "y@example.org")
    )


def test_a_loop_of_names_that_are_no_users_bounces() -> None:
    found = resolve("a", book({"a": ("b",), "b": ("a@bcd.test",)}))
    assert found == Undeliverable(False, "5.4.6 alias loop: a -> b -> a")


def test_a_forward_file_sends_on_and_backslash_keeps_a_copy() -> None:
    forwards: dict[str, Forward] = {"bob": ("\\bob", "bob@elsewhere.test"), "alice": ("bob",)}
    assert resolve("alice", book({}, forwards)) == Delivery(("bob",), ("bob@elsewhere.test",))
    loop: dict[str, Forward] = {"alice": ("info@bcd.test",)}
    assert resolve("info", book({"info": ("alice",)}, loop)) == Undeliverable(
        False, "5.4.6 alias loop: info -> alice -> info"
    )


def test_an_unusable_forward_file_makes_the_mail_wait() -> None:
    broken: dict[str, Forward] = {"bob": Undeliverable(True, "4.3.5 mail/bob/.forward is odd")}
    assert resolve("bob", book({}, broken)) == broken["bob"]


def test_what_nsmail_refuses_makes_the_mail_wait_and_comes_before_a_bounce() -> None:
    found = resolve("list", book({"list": ("nobody", "|/usr/bin/mailman post list")}))
    assert found == Undeliverable(
        True, "4.3.5 aliases: list: '|/usr/bin/mailman post list' is a command: " + REFUSAL
    )
    found = resolve("bob", book({}, {"bob": ("/var/mail/bob.copy",)}))
    assert isinstance(found, Undeliverable) and found.temporary
    assert "the .forward of bob" in found.text and "is a file" in found.text


def test_unknown_names_in_an_expansion_say_where_they_came_from() -> None:
    assert resolve("staff", book({"staff": ("alice", "b9")})) == Undeliverable(
        False, "5.1.1 no such user here: b9 (from staff)"
    )
    assert resolve("x", book({"x": ("\\b9",)})) == Undeliverable(
        False, "5.1.1 no such user here: b9 (from x)"
    )


@pytest.mark.parametrize(
    ("aliases", "message"),
    [
        ({f"n{i}": (f"n{i + 1}",) for i in range(MAX_DEPTH + 1)}, "nested more than"),
        ({"n0": tuple(f"u{i}@example.org" for i in range(MAX_TARGETS + 1))}, "more than 1000"),
    ],
    ids=["deep", "wide"],
)
def test_expansions_are_bounded(aliases: dict[str, tuple[str, ...]], message: str) -> None:
    found = resolve("n0", book(aliases))
    assert isinstance(found, Undeliverable) and not found.temporary
    assert message in found.text
