"""Delivery status notifications: structure as the stdlib parses it, and hostile text."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage, Message
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsmail.core.dsn import Failure, bounce
from nsmail.core.headers import MAX_LINE

ARRIVAL = datetime(2024, 3, 5, 9, 0, 0, tzinfo=UTC)
NOW = datetime(2024, 3, 6, 10, 30, 0, tzinfo=timezone(timedelta(hours=-5)))
ORIGINAL = (
    b"From: alice@bcd.test\r\nTo: bob@rcpt.test\r\nSubject: hello\r\n"
    b"Message-ID: <Q1@bcd.test>\r\n\r\nHi Bob,\r\n.\r\nbye\r\n"
)
NO_SUCH_USER = Failure(
    recipient="bob@rcpt.test",
    status="5.1.1",
    action="failed",
    diagnostic="smtp; 550 5.1.1 <bob@rcpt.test>: no such user",
    remote_mta="mx.rcpt.test",
)
TIMED_OUT = Failure(recipient="carol@rcpt.test", status="4.4.1", action="failed")
# A refusal nsmail made itself, from what the server offers: words, and no reply.
NO_SMTPUTF8 = Failure(
    recipient="jörg@rcpt.test",
    status="5.6.7",
    action="failed",
    detail="5.6.7 SMTPUTF8 is required, but mx.rcpt.test[198.51.100.25]:25 does not offer it",
)


def make(failures: list[Failure], **options: Any) -> bytes:
    arguments: dict[str, Any] = {
        "reporting_mta": "mx.bcd.test",
        "original_sender": "alice@bcd.test",
        "failures": failures,
        "original": ORIGINAL,
        "arrival": ARRIVAL,
        "now": NOW,
        "unique": "4Xq7Zb",
    }
    return bounce(**(arguments | options))


def parse(notification: bytes) -> EmailMessage:
    message = email.message_from_bytes(notification, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(notification: bytes) -> list[EmailMessage]:
    message = parse(notification)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    found = list(message.iter_parts())
    assert [part.get_content_type() for part in found][:2] == [
        "text/plain",
        "message/delivery-status",
    ]
    assert len(found) == 3
    return found


def status_blocks(notification: bytes) -> list[Message]:
    # The stdlib parses message/delivery-status into a list of header-only messages: the
    # per-message block first, then one per recipient.
    blocks = parts(notification)[1].get_payload()
    assert isinstance(blocks, list)
    return blocks


def raw(block: Message, name: str) -> str:
    """A field's value as written, unfolded, without the stdlib decoding encoded-words."""
    values = [value for key, value in block.raw_items() if key.lower() == name.lower()]
    assert len(values) == 1, (name, values)
    return re.sub(r"\r\n(?=[ \t])", "", values[0])


def test_bounce_header_and_report_fields() -> None:
    notification = make([NO_SUCH_USER, TIMED_OUT])
    message = parse(notification)
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx.bcd.test>"
    assert message["To"] == "alice@bcd.test"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Date"] == "Wed, 06 Mar 2024 10:30:00 -0500"
    assert message["Message-ID"] == "<4Xq7Zb@mx.bcd.test>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert "Content-Transfer-Encoding" not in message

    per_message, bob, carol = status_blocks(notification)
    assert raw(per_message, "Reporting-MTA") == "dns; mx.bcd.test"
    assert raw(per_message, "Arrival-Date") == "Tue, 05 Mar 2024 09:00:00 +0000"
    assert dict(bob.raw_items()) == {
        "Final-Recipient": "rfc822; bob@rcpt.test",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.rcpt.test",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@rcpt.test>: no such user",
        "Last-Attempt-Date": "Wed, 06 Mar 2024 10:30:00 -0500",
    }
    assert dict(carol.raw_items()) == {
        "Final-Recipient": "rfc822; carol@rcpt.test",
        "Action": "failed",
        "Status": "4.4.1",
        "Last-Attempt-Date": "Wed, 06 Mar 2024 10:30:00 -0500",
    }


def test_human_part_names_each_recipient_and_what_was_said() -> None:
    text = parts(make([NO_SUCH_USER, TIMED_OUT]))[0].get_content().replace("\r\n", "\n")
    assert "This is the mail system at mx.bcd.test." in text
    assert "could not be delivered" in text
    assert "<bob@rcpt.test>:\n    host mx.rcpt.test said:\n    smtp; 550 5.1.1" in text
    assert "<carol@rcpt.test>:\n    no further detail" in text


def test_what_nsmail_decided_itself_is_no_remote_reply() -> None:
    # RFC 3464 2.3.5, 2.3.6: Remote-MTA and Diagnostic-Code report what a server said.
    notification = make([NO_SMTPUTF8])
    _, block = status_blocks(notification)
    assert [name for name, _ in block.raw_items()] == [
        "Final-Recipient",
        "Action",
        "Status",
        "Last-Attempt-Date",
    ]
    text = parts(notification)[0].get_content().replace("\r\n", "\n")
    assert "said" not in text
    assert "    5.6.7 SMTPUTF8 is required, but mx.rcpt.test[198.51.100.25]:25 does" in text
    with pytest.raises(ValueError, match="Remote-MTA"):
        Failure("bob@rcpt.test", "5.6.7", "failed", remote_mta="mx.rcpt.test", detail="x")


def test_original_is_returned_byte_for_byte() -> None:
    notification = make([NO_SUCH_USER])
    returned = parts(notification)[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Description"] == "Undelivered Message"
    assert b"\r\n\r\n" + ORIGINAL + b"\r\n--" in notification


def test_delay_warning() -> None:
    delayed = Failure("bob@rcpt.test", "4.4.1", "delayed", "smtp; 451 try later", "mx.rcpt.test")
    notification = make([delayed], delayed=True)
    assert parse(notification)["Subject"] == "Delayed Mail (still being retried)"
    assert raw(status_blocks(notification)[1], "Action") == "delayed"
    assert "This is only a warning" in parts(notification)[0].get_content()


@pytest.mark.parametrize("options", [{"include_body": False}, {"max_original": len(ORIGINAL) - 1}])
def test_only_the_header_when_body_unwanted_or_too_big(options: dict[str, Any]) -> None:
    notification = make([NO_SUCH_USER], **options)
    returned = parts(notification)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    header = ORIGINAL.split(b"\r\n\r\n")[0]
    assert b"\r\n\r\n" + header + b"\r\n\r\n--" in notification
    assert b"Hi Bob" not in notification


def test_header_only_copy_is_cut_at_whole_lines() -> None:
    original = b"".join(b"X-Line-%d: %s\r\n" % (n, b"v" * 50) for n in range(100)) + b"\r\nbody"
    notification = make([NO_SUCH_USER], original=original, max_original=1000)
    returned = notification.split(b"Content-Type: text/rfc822-headers\r\n\r\n")[1]
    copied = returned.split(b"\r\n\r\n--")[0] + b"\r\n"
    assert original.startswith(copied)
    assert 900 < len(copied) <= 1000


def test_eight_bit_original_is_labelled_8bit() -> None:
    original = "Subject: grüße\r\n\r\nÄrger\r\n".encode()
    notification = make([NO_SUCH_USER], original=original)
    assert parse(notification)["Content-Transfer-Encoding"] == "8bit"
    assert parts(notification)[2]["Content-Transfer-Encoding"] == "8bit"
    assert b"\r\n\r\n" + original + b"\r\n--" in notification


def test_original_line_ends_and_long_lines_are_repaired() -> None:
    original = b"Subject: x\n\nbare\rlf\n" + b"y" * 1500 + b"\0"
    notification = make([NO_SUCH_USER], original=original)
    assert b"\r\n\r\nSubject: x\r\n\r\nbare\r\nlf\r\n" + b"y" * 998 + b"\r\n" in notification
    assert_well_formed(notification)


def test_non_ascii_recipient_and_diagnostic_stay_seven_bit_in_the_report() -> None:
    failure = Failure("jörg@bücher.test", "5.1.1", "failed", "smtp; 550 unbekannt: jörg")
    notification = make([failure])
    block = status_blocks(notification)[1]
    assert raw(block, "Final-Recipient") == "utf-8; j\\x{F6}rg@b\\x{FC}cher.test"
    assert raw(block, "Diagnostic-Code") == "smtp; 550 unbekannt: j\\x{F6}rg"
    text_part = parts(notification)[0]
    assert text_part["Content-Transfer-Encoding"] == "quoted-printable"
    assert "<jörg@bücher.test>:" in text_part.get_content()
    assert "Content-Transfer-Encoding" not in parse(notification)


def test_untyped_diagnostic_gets_our_type() -> None:
    failure = Failure("bob@rcpt.test", "5.4.4", "failed", "Host or domain name not found")
    block = status_blocks(make([failure]))[1]
    assert raw(block, "Diagnostic-Code") == "X-nsmail; Host or domain name not found"


def test_line_breaks_in_text_cannot_inject_fields() -> None:
    failure = Failure(
        "bob@rcpt.test\r\nAction: delivered",
        "5.1.1",
        "failed",
        "smtp; 550 x\r\n\r\nFinal-Recipient: rfc822; evil@x.test",
        "mx.rcpt.test\nStatus: 2.0.0",
    )
    notification = make([failure], original_sender="alice@bcd.test\r\nBcc: evil@x.test")
    assert parse(notification)["Bcc"] is None
    _, block = status_blocks(notification)
    assert raw(block, "Action") == "failed"
    assert raw(block, "Status") == "5.1.1"
    assert raw(block, "Final-Recipient") == "rfc822; bob@rcpt.test  Action: delivered"


def test_boundary_never_occurs_in_the_content() -> None:
    plain = make([NO_SUCH_USER])
    boundary = parse(plain).get_boundary()
    assert boundary is not None
    hostile = ORIGINAL + b"--" + boundary.encode() + b"--\r\n"
    notification = make([NO_SUCH_USER], original=hostile)
    other = parse(notification).get_boundary()
    assert other is not None and other != boundary
    assert len(other) <= 70
    assert b"\r\n\r\n" + hostile + b"\r\n--" + other.encode() + b"--\r\n" in notification


def test_refused_calls() -> None:
    with pytest.raises(ValueError, match="null sender"):
        make([NO_SUCH_USER], original_sender="")
    with pytest.raises(ValueError, match="at least one"):
        make([])


def test_failure_checks_status_and_action() -> None:
    with pytest.raises(ValueError, match="enhanced status"):
        Failure("bob@rcpt.test", "550", "failed")
    with pytest.raises(ValueError, match="action"):
        Failure("bob@rcpt.test", "5.1.1", "delivered")  # type: ignore[arg-type]


def assert_well_formed(notification: bytes) -> None:
    lines = notification.split(b"\r\n")
    assert lines[-1] == b""
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert all(len(line) <= MAX_LINE for line in lines)
    assert b"\0" not in notification


def expected_field(text: str) -> str:
    text = re.sub(r"[\x00-\x1f\x7f]", " ", text.encode(errors="replace").decode())
    return "".join(char if char.isascii() else f"\\x{{{ord(char):X}}}" for char in text)


texts = st.text(max_size=300)
# (diagnostic, remote MTA): a server's reply, maybe without its name, or none.
replies = st.one_of(
    st.just((None, None)), st.tuples(st.text(min_size=1, max_size=300), st.none() | texts)
)
failures = st.builds(
    lambda recipient, status, action, reply, detail: Failure(
        recipient, status, action, *reply, detail=detail
    ),
    recipient=texts,
    status=st.sampled_from(["5.1.1", "4.4.1", "5.7.1", "4.0.0"]),
    action=st.sampled_from(["failed", "delayed"]),
    reply=replies,
    detail=st.none() | texts,
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(failures, min_size=1, max_size=4),
    st.binary(max_size=500),
    st.text(min_size=1, max_size=100),
    st.booleans(),
)
def test_arbitrary_text_still_parses_into_the_right_fields(
    given_failures: list[Failure], original: bytes, sender: str, delayed: bool
) -> None:
    notification = make(given_failures, original=original, original_sender=sender, delayed=delayed)
    assert_well_formed(notification)
    blocks = status_blocks(notification)
    assert len(blocks) == 1 + len(given_failures)
    for failure, block in zip(given_failures, blocks[1:], strict=True):
        kind = "rfc822" if failure.recipient.isascii() else "utf-8"
        assert raw(block, "Final-Recipient") == f"{kind}; {expected_field(failure.recipient)}"
        assert raw(block, "Action") == failure.action
        assert raw(block, "Status") == failure.status
