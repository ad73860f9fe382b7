"""The pure core of nsmail.submit.sendmail: the option parser, the address checks, reading
the message and the header's look for recipients (the real console script:
tests/loopback/test_sendmail.py)."""

from __future__ import annotations

import contextlib
import io
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsmail.core.headers import Completion, HeaderError, complete
from nsmail.submit.sendmail import (
    DELIVER,
    FLUSH,
    LIST,
    SMTP,
    VERIFY,
    Options,
    SendmailError,
    envelope_sender,
    names_a_recipient,
    parse_args,
    qualify,
    read_message,
)
from nsmail.submit.submission import Profile

EX_USAGE, EX_DATAERR, EX_NOPERM = 64, 65, 77
NOW = datetime(2025, 1, 1, tzinfo=UTC)

# --- option parser ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], Options()),
        (["bob@x.test", "carol"], Options(recipients=("bob@x.test", "carol"))),
        (["-t"], Options(extract=True)),
        (["-t", "bob@x.test"], Options(extract=True, recipients=("bob@x.test",))),
        (["-i"], Options(dot_ends=False)),
        (["-oi"], Options(dot_ends=False)),
        (["-o", "i"], Options(dot_ends=False)),
        (["-ti"], Options(extract=True, dot_ends=False)),
        (["-f", "a@b.test"], Options(sender="a@b.test")),
        (["-fa@b.test"], Options(sender="a@b.test")),
        (["-r", "a@b.test"], Options(sender="a@b.test")),
        (["-ra@b.test"], Options(sender="a@b.test")),
        (["-f", "<>"], Options(sender="<>")),
        (["-f", ""], Options(sender="")),
        (["-tif", "a@b.test"], Options(extract=True, dot_ends=False, sender="a@b.test")),
        (["-F", "Alice Liddell"], Options(full_name="Alice Liddell")),
        (["-FAlice"], Options(full_name="Alice")),
        (["-bm"], Options(mode=DELIVER)),
        (["-b", "p"], Options(mode=LIST)),
        (["-bp"], Options(mode=LIST)),
        (["-q"], Options(mode=FLUSH)),
        (["-bs"], Options(mode=SMTP)),
        (["-bv", "bob"], Options(mode=VERIFY, recipients=("bob",))),
        (["-bp", "-q"], Options(mode=FLUSH)),
        (["-vq"], Options(mode=FLUSH, verbose=True)),
        (["-v", "bob"], Options(verbose=True, recipients=("bob",))),
        (["bob", "-f", "a@b.test"], Options(sender="a@b.test", recipients=("bob",))),
        (["--", "-t", "--tenant"], Options(recipients=("-t", "--tenant"))),
        (["-", "bob"], Options(recipients=("-", "bob"))),
        (["--tenant", "a.test"], Options(tenant="a.test")),
        (["--tenant=a.test", "bob"], Options(tenant="a.test", recipients=("bob",))),
        # Accepted and ignored.
        (["-odi", "-oem", "-oQ/var/spool/x", "-o", "em"], Options()),
        (["-B8BITMIME", "-B", "7BIT", "-N", "never", "-Rhdrs", "-V", "id1", "-X/tmp/x"], Options()),
        (["-U", "-Ui"], Options(dot_ends=False)),
    ],
)
def test_parse_args(argv: list[str], expected: Options) -> None:
    assert parse_args(argv) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-x"], "unknown option -x"),
        (["-C", "/etc/mail"], "unknown option -C"),
        (["-ti", "-h5"], "unknown option -h"),
        (["--verbose"], "unknown option --verbose"),
        (["--tenant"], "--tenant needs a domain"),
        (["-f"], "option -f needs a value"),
        (["bob", "-F"], "option -F needs a value"),
        (["-q30m"], "only a plain -q"),
        (["-bd"], "-bd is not supported (only -bm, -bp, -bs and -bv)"),
        (["-F", "Eve\nBcc: x@y.test"], "control characters"),
        (["-\x1b[2J"], "unknown option -\\x1b"),
    ],
)
def test_parse_args_refuses(argv: list[str], message: str) -> None:
    with pytest.raises(SendmailError) as caught:
        parse_args(argv)
    assert caught.value.code == EX_USAGE
    assert message in caught.value.message
    assert "\n" not in caught.value.message


@given(st.lists(st.text(alphabet=st.sampled_from("-tivqbpfFroBU=@ x.\n\x00\udcff"), max_size=8)))
def test_parse_args_on_anything_returns_options_or_one_usage_line(argv: list[str]) -> None:
    try:
        parse_args(argv)
    except SendmailError as e:
        assert e.code == EX_USAGE and e.message.isprintable()


@given(st.text(max_size=300))
def test_qualify_on_anything_returns_a_plain_address_or_refuses(text: str) -> None:
    try:
        address = qualify(text, "bcd.test")
    except SendmailError as e:
        assert e.code == EX_USAGE and e.message.isprintable()
        return
    assert address.isprintable() and not any(c.isspace() or c in "<>" for c in address)
    local, _, domain = address.rpartition("@")
    assert local and domain and len(address) <= 254


# --- addresses -------------------------------------------------------------------------


def tenant(*, foreign_senders: bool = False) -> Profile:
    return Profile(
        domain="bcd.test",
        spool="/nonexistent",
        uid=45001,
        gid=45001,
        is_host=False,
        foreign_senders=foreign_senders,
        message_size_limit=0,
        queue_size_limit=0,
        users=(),
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("alice", "alice@bcd.test"),
        ("alice@cde.test", "alice@cde.test"),
        ("a.b+tag@sub.cde.test", "a.b+tag@sub.cde.test"),
        ("alice@[198.51.100.7]", "alice@[198.51.100.7]"),
        ("jos\u00e9@cde.test", "jos\u00e9@cde.test"),
    ],
)
def test_qualify(given: str, expected: str) -> None:
    assert qualify(given, "bcd.test") == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "alice bob@x.test",
        "alice@x.test\n",
        "tab\there",
        "<alice@x.test>",
        "alice>",
        "@x.test",
        "alice@",
        "alice@.x.test",
        "alice@x.test.",
        "alice@x..test",
        "\x00",
        "\u2028alice",
        "a" * 250 + "@x.test",
        "a" * 250,  # too long once qualified
    ],
)
def test_qualify_refuses(bad: str) -> None:
    with pytest.raises(SendmailError) as caught:
        qualify(bad, "bcd.test")
    assert caught.value.code == EX_USAGE
    assert caught.value.message.isprintable()


@pytest.mark.parametrize(
    ("given", "foreign", "expected"),
    [
        (None, False, "alice@bcd.test"),
        ("<>", False, ""),
        ("", False, ""),
        ("bob", False, "bob@bcd.test"),
        ("bob@BCD.Test", False, "bob@BCD.Test"),
        ("<bob@bcd.test>", False, "bob@bcd.test"),
        ("bob@cde.test", True, "bob@cde.test"),
    ],
)
def test_envelope_sender(given: str | None, foreign: bool, expected: str) -> None:
    assert envelope_sender(given, "alice", tenant(foreign_senders=foreign)) == expected


@pytest.mark.parametrize("foreign", ["bob@cde.test", "bob@sub.bcd.test", "bob@bcd.test.evil.test"])
def test_envelope_sender_refuses_foreign_domains(foreign: str) -> None:
    with pytest.raises(SendmailError) as caught:
        envelope_sender(foreign, "alice", tenant())
    assert caught.value.code == EX_NOPERM
    assert "foreign_senders" in caught.value.message


# --- reading the message ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "dot_ends", "expected"),
    [
        (b"a\n.\nb\n", True, b"a\n"),
        (b"a\r\n.\r\nb\r\n", True, b"a\r\n"),
        (b".\n", True, b""),
        (b"a\n.", True, b"a\n"),  # the dot line at end of input, unterminated
        (b"a\n..\n.b\n. \n", True, b"a\n..\n.b\n. \n"),
        (b"a\n.\nb\n", False, b"a\n.\nb\n"),
        (b"", True, b""),
        (b"no newline", True, b"no newline"),
    ],
)
def test_read_message(data: bytes, dot_ends: bool, expected: bytes) -> None:
    assert read(data, dot_ends=dot_ends, limit=100) == expected


def read(data: bytes, *, dot_ends: bool, limit: int) -> bytes:
    return b"".join(read_message(io.BytesIO(data), dot_ends=dot_ends, limit=limit))


def test_a_dot_inside_a_line_longer_than_a_read_does_not_end_the_message() -> None:
    data = b"x" * (1 << 16) + b".\nmore\n.\n"
    assert read(data, dot_ends=True, limit=0) == data[:-2]


def test_a_message_is_read_in_pieces() -> None:
    pieces = list(read_message(io.BytesIO(b"x" * 300_000), dot_ends=False, limit=0))
    assert len(pieces) > 1 and max(map(len, pieces)) <= 1 << 16


@pytest.mark.parametrize("dot_ends", [True, False])
def test_read_message_limit(dot_ends: bool) -> None:
    exact = b"123456789\n"
    ended = exact + b".\n" if dot_ends else exact
    assert read(ended, dot_ends=dot_ends, limit=10) == exact
    # One more line, even one starting with a dot, is one too many.
    for extra in (b"x", b".abc\n", b".\r"):
        with pytest.raises(SendmailError) as caught:
            read(exact + extra, dot_ends=dot_ends, limit=10)
        assert caught.value.code == EX_DATAERR


# --- the header's look for recipients --------------------------------------------------


ADDRESS_LIST_PIECES = st.sampled_from(
    [
        "a",
        "a.b",
        "b@c.test",
        "[x]",
        "@",
        "<",
        ">",
        "<>",
        ",",
        ";",
        ":",
        '"',
        "\\",
        "(",
        ")",
        " ",
        "\t",
    ]
)


@given(st.lists(ADDRESS_LIST_PIECES, max_size=12).map("".join), st.sampled_from(["To", "Cc"]))
def test_a_header_said_to_name_no_recipient_gives_the_worker_none(value: str, name: str) -> None:
    # The lean look at submission refuses only what the worker's parser would find no
    # recipient in (or cannot read at all): it never refuses mail that could be sent.
    head = f"Subject: s\r\n{name}: {value}\r\n\r\n".encode()
    if names_a_recipient(head, truncated=False):
        return
    completion = Completion("bcd.test", "alice", None, "a@bcd.test", NOW, "id", True)
    with contextlib.suppress(HeaderError):  # a header the worker cannot read: no recipient
        assert complete(head, completion).recipients == ()


def test_a_header_longer_than_the_look_is_left_to_the_worker() -> None:
    head = b"X-Long: " + b"x" * 100 + b"\r\nSubj"
    assert names_a_recipient(head, truncated=True)
    assert not names_a_recipient(head, truncated=False)
