"""The queue file codec: round trip, and nothing but QueueFileError on hostile bytes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsmail.core import queueframe
from nsmail.core.queuefile import (
    MAX_DEFERRAL_TEXT,
    MAX_ENVELOPE,
    MAX_RELAY,
    TRAILER_BYTES,
    Deferral,
    Envelope,
    QueueFileError,
    decode,
    encode,
    envelope_of,
    frame,
    parse,
    valid_queue_id,
)

addresses = st.text(min_size=1, max_size=40)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    recipients = tuple(draw(st.lists(addresses, min_size=1, max_size=5)))
    deferrals = draw(
        st.lists(
            st.builds(
                Deferral,
                recipient=st.sampled_from(recipients),
                status=st.sampled_from(["4.7.1", "4.4.2", "5.1.1"]),
                text=st.text(max_size=MAX_DEFERRAL_TEXT),
                code=st.none() | st.integers(min_value=200, max_value=599),
                relay=st.text(max_size=40),
                at=st.floats(min_value=0, max_value=4e9),
            ),
            max_size=len(recipients),
        )
    )
    return Envelope(
        sender=draw(st.text(max_size=40)),
        recipients=recipients,
        arrival=draw(st.floats(min_value=0, max_value=4e9)),
        attempts=draw(st.integers(min_value=0, max_value=1000)),
        warned=draw(st.booleans()),
        submitter=draw(st.text(max_size=20)),
        full_name=draw(st.text(max_size=20)),
        extract=draw(st.booleans()),
        cleaned=draw(st.booleans()),
        deferrals=tuple(deferrals),
    )


@given(envelopes(), st.binary(max_size=2000))
def test_round_trip(envelope: Envelope, body: bytes) -> None:
    assert decode(encode(envelope, body)) == (envelope, body)


@given(st.binary(max_size=500))
def test_arbitrary_bytes_raise_only_queue_file_error(data: bytes) -> None:
    with pytest.raises(QueueFileError):
        decode(data)


@given(envelopes(), st.binary(max_size=200), st.data())
def test_any_single_byte_change_is_detected(
    envelope: Envelope, body: bytes, data: st.DataObject
) -> None:
    framed = bytearray(encode(envelope, body))
    index = data.draw(st.integers(0, len(framed) - 1))
    framed[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(QueueFileError):
        decode(bytes(framed))


@given(envelopes(), st.binary(max_size=200), st.data())
def test_torn_or_extended_file_is_detected(
    envelope: Envelope, body: bytes, data: st.DataObject
) -> None:
    framed = encode(envelope, body)
    cut = data.draw(st.integers(0, len(framed) - 1))
    with pytest.raises(QueueFileError):
        decode(framed[:cut])
    with pytest.raises(QueueFileError):
        decode(framed + data.draw(st.binary(min_size=1, max_size=20)))


@pytest.mark.parametrize(
    "record",
    [
        b"[]",
        b'{"sender":"a@b.test"}',
        b'{"sender":"a@b.test","recipients":[]}',
        b'{"sender":"a@b.test","recipients":[""]}',
        b'{"sender":1,"recipients":["c@d.test"]}',
        b'{"sender":"a@b.test","recipients":["c@d.test"],"extra":1}',
        b"[" * 100_000,
        b"\xff",
    ],
)
def test_bad_envelopes_with_valid_framing_are_rejected(record: bytes) -> None:
    with pytest.raises(QueueFileError):
        decode(version_1_with(record))


def version_1_with(record: bytes) -> bytes:
    """A well-framed version 1 file around `record` (and an empty body)."""
    framed = b"NSMAIL-QUEUE 1\nenvelope %d\n%s\nbody 0\n\n" % (len(record), record)
    return framed + b"end %s\n" % hashlib.sha256(framed).hexdigest().encode()


def test_queue_ids() -> None:
    assert valid_queue_id("18f3a.c0ffee")
    for bad in ("", ".hidden", "a/b", "..", "x" * 200, "a\nb"):
        assert not valid_queue_id(bad)


def test_a_file_from_before_new_fields_still_decodes() -> None:
    # An old writer knew only sender and recipients: the newer fields take defaults.
    old = encode(Envelope("a@tenant.test", ("b@rcpt.test",)), b"hi")
    assert decode(old)[0].attempts == 0


@pytest.mark.parametrize(
    "record",
    [
        b'{"sender":"a","recipients":["b"],"colour":1}',
        b'{"sender":"a","recipients":["b"],"attempts":true}',
        b'{"sender":"a","recipients":["b"],"arrival":NaN}',
        b'{"sender":"a","recipients":["b"],"attempts":-1}',
        b'{"sender":"a","recipients":[]}',
        b'{"sender":"a","recipients":["b"],"warned":1}',
    ],
)
def test_envelopes_that_lie_are_refused(record: bytes) -> None:
    with pytest.raises(QueueFileError):
        decode(version_1_with(record))


WAITING = Deferral("b@rcpt.test", "4.7.1", "4.7.1 greylisted", 451, "mx.test[2001:db8::25]:25", 1e9)


def test_a_deferred_message_carries_why_each_recipient_waits() -> None:
    envelope = Envelope("a@tenant.test", ("b@rcpt.test", "c@rcpt.test"), deferrals=(WAITING,))
    assert decode(encode(envelope, b"hi"))[0] == envelope
    assert WAITING.reason == "mx.test[2001:db8::25]:25 said: 451 4.7.1 greylisted"
    own = Deferral("c@rcpt.test", "4.4.2", "4.4.2 mx.test[2001:db8::25]:25: connection refused")
    assert own.reason == own.text  # no reply: nsmail's words alone


def test_deferrals_are_cut_to_what_the_reader_takes() -> None:
    long = Deferral.bounded("b@rcpt.test", "4.7.1", "x" * 10_000, 451, "y" * 10_000, 1e9)
    assert (len(long.text), len(long.relay)) == (MAX_DEFERRAL_TEXT, MAX_RELAY)
    envelope = Envelope("a@tenant.test", ("b@rcpt.test",), deferrals=(long,))
    assert decode(encode(envelope, b""))[0] == envelope


def test_deferrals_that_would_overflow_the_envelope_are_left_out() -> None:
    # Thousands of recipients, each with a long reason: the message must stay readable.
    recipients = tuple(f"r{n:05}@rcpt.test" for n in range(3000))
    deferrals = tuple(
        Deferral.bounded(r, "4.7.1", "\u2603" * MAX_DEFERRAL_TEXT, 451, "mx.test", 1e9)
        for r in recipients
    )
    envelope = Envelope("a@tenant.test", recipients, deferrals=deferrals)
    decoded, _ = decode(encode(envelope, b""))
    assert decoded == Envelope("a@tenant.test", recipients)
    assert len(encode(decoded, b"")) < MAX_ENVELOPE


def deferred_with(deferral: str, recipients: str = '["b@rcpt.test"]') -> bytes:
    return version_1_with(
        b'{"sender":"a","recipients":%s,"deferrals":[%s]}'
        % (recipients.encode(), deferral.encode())
    )


@pytest.mark.parametrize(
    "deferral",
    [
        '{"recipient":"other@rcpt.test","status":"4.7.1","text":"x"}',  # not waiting
        '{"recipient":"b@rcpt.test","status":"4.7.1"}',
        '{"recipient":"b@rcpt.test","status":"4.7.1","text":"x","colour":1}',
        '{"recipient":"b@rcpt.test","status":"451","text":"x"}',
        '{"recipient":"b@rcpt.test","status":"4.7.1","text":"%s"}' % ("x" * 501),
        '{"recipient":"b@rcpt.test","status":"4.7.1","text":"x","relay":"%s"}' % ("y" * 321),
        '{"recipient":"b@rcpt.test","status":"4.7.1","text":"x","code":true}',
        '{"recipient":"b@rcpt.test","status":"4.7.1","text":"x","code":99}',
        '{"recipient":"b@rcpt.test","status":"4.7.1","text":"x","at":NaN}',
        '{"recipient":"b@rcpt.test","status":"4.7.1","text":7}',
        '{"recipient":"b@rcpt.test","status":"4.7.1","text":"x"},'
        '{"recipient":"b@rcpt.test","status":"4.7.1","text":"x"}',  # more than recipients
        "[]",
    ],
)
def test_deferrals_out_of_bounds_are_refused(deferral: str) -> None:
    # Tenant-written, and printed by the queue tools: bounded, or the file is refused.
    with pytest.raises(QueueFileError):
        decode(deferred_with(deferral))


def test_the_queue_tools_wire_is_checked_as_a_file_is() -> None:
    envelope = Envelope("a@tenant.test", ("b@rcpt.test",), deferrals=(WAITING,))
    wire = json.loads(json.dumps(dataclasses.asdict(envelope)))
    assert envelope_of(wire) == envelope
    with pytest.raises(QueueFileError):
        envelope_of({**wire, "deferrals": [{**wire["deferrals"][0], "text": "x" * 501}]})


def test_recipients_may_wait_for_extraction_before_clean_up() -> None:
    waiting = Envelope("a@tenant.test", (), extract=True)
    assert decode(encode(waiting, b"To: b@rcpt.test\r\n\r\n"))[0] == waiting


# --- version 2 framing, and files left by version 1 ------------------------------------

V1_FILES = Path(__file__).parents[1] / "support" / "data" / "queue-v1"


def test_version_1_files_written_by_the_first_release_still_decode() -> None:
    envelope, body = decode((V1_FILES / "fresh").read_bytes())
    assert envelope.recipients == ("bob@rcpt.test", "carol@rcpt.test") and not envelope.cleaned
    assert body.startswith(b"Subject: written by release 1\n")
    envelope, body = decode((V1_FILES / "deferred").read_bytes())
    assert (envelope.attempts, envelope.warned, envelope.cleaned) == (3, True, True)
    assert envelope.deferrals == ()  # release 1 did not say why
    assert body.endswith(b"\r\n\r\ndeferred body\r\n")


def test_version_1_body_length_must_match_the_file() -> None:
    data = (V1_FILES / "fresh").read_bytes()
    lying = data.replace(b"\nbody 60\n", b"\nbody 61\n")
    with pytest.raises(QueueFileError, match="truncated body"):
        decode(lying)


def test_the_written_version_is_2_and_streams_in_pieces() -> None:
    envelope = Envelope("a@tenant.test", ("b@rcpt.test",))
    pieces = [b"Subject: x\n", b"\n", b"", b"body\nend " + b"0" * 64 + b"\n", b"more"]
    framed = b"".join(frame(envelope, pieces))
    assert framed.startswith(b"NSMAIL-QUEUE 2\n") and framed == encode(envelope, b"".join(pieces))
    assert decode(framed) == (envelope, b"".join(pieces))


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=400))
def test_parse_from_head_and_tail_alone(body: bytes, head_size: int) -> None:
    framed = encode(Envelope("a@tenant.test", ("b@rcpt.test",)), body)
    head = framed[: max(head_size, len(framed) - len(body) - TRAILER_BYTES)]
    layout = parse(head, framed[-TRAILER_BYTES:], len(framed))
    assert framed[layout.body_start : layout.body_start + layout.body_length] == body
    layout.verify(hashlib.sha256(framed[: layout.checked]).digest())


_FIELDS = st.dictionaries(
    st.text(max_size=12),
    st.recursive(
        st.one_of(
            st.text(),  # every code point: controls, surrogates, astral
            st.none(),
            st.booleans(),
            st.integers(),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
        ),
        max_leaves=12,
    ),
    max_size=6,
)


@given(_FIELDS, st.lists(st.binary(max_size=40), max_size=4))
def test_the_envelope_is_written_as_json_dumps_writes_it(
    record: dict[str, queueframe.Field], body: list[bytes]
) -> None:
    data = b"".join(queueframe.frame(record, body))
    expected = json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    head = b"%senvelope %d\n%s\nbody\n" % (queueframe.MAGIC, len(expected), expected)
    assert data.startswith(head)
    assert data[len(head) :].startswith(b"".join(body) + b"\nend ")
    assert hashlib.sha256(data[: data.rindex(b"end ")]).hexdigest().encode() in data[-66:]
