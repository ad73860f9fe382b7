"""The queue file codec: round trip, and nothing but QueueFileError on hostile bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsmail import queueframe
from nsmail.queuefile import (
    TRAILER_BYTES,
    Envelope,
    QueueFileError,
    decode,
    encode,
    frame,
    parse,
    valid_queue_id,
)

addresses = st.text(min_size=1, max_size=40)
envelopes = st.builds(
    Envelope,
    sender=st.text(max_size=40),
    recipients=st.lists(addresses, min_size=1, max_size=5).map(tuple),
    arrival=st.floats(min_value=0, max_value=4e9),
    attempts=st.integers(min_value=0, max_value=1000),
    warned=st.booleans(),
    submitter=st.text(max_size=20),
    full_name=st.text(max_size=20),
    extract=st.booleans(),
    cleaned=st.booleans(),
)


@given(envelopes, st.binary(max_size=2000))
def test_round_trip(envelope: Envelope, body: bytes) -> None:
    assert decode(encode(envelope, body)) == (envelope, body)


@given(st.binary(max_size=500))
def test_arbitrary_bytes_raise_only_queue_file_error(data: bytes) -> None:
    with pytest.raises(QueueFileError):
        decode(data)


@given(envelopes, st.binary(max_size=200), st.data())
def test_any_single_byte_change_is_detected(
    envelope: Envelope, body: bytes, data: st.DataObject
) -> None:
    framed = bytearray(encode(envelope, body))
    index = data.draw(st.integers(0, len(framed) - 1))
    framed[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(QueueFileError):
        decode(bytes(framed))


@given(envelopes, st.binary(max_size=200), st.data())
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


def test_recipients_may_wait_for_extraction_before_clean_up() -> None:
    waiting = Envelope("a@tenant.test", (), extract=True)
    assert decode(encode(waiting, b"To: b@rcpt.test\r\n\r\n"))[0] == waiting


# --- version 2 framing, and files left by version 1 ------------------------------------

V1_FILES = Path(__file__).parent / "data" / "queue-v1"


def test_version_1_files_written_by_the_first_release_still_decode() -> None:
    envelope, body = decode((V1_FILES / "fresh").read_bytes())
    assert envelope.recipients == ("bob@rcpt.test", "carol@rcpt.test") and not envelope.cleaned
    assert body.startswith(b"Subject: written by release 1\n")
    envelope, body = decode((V1_FILES / "deferred").read_bytes())
    assert (envelope.attempts, envelope.warned, envelope.cleaned) == (3, True, True)
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
    st.one_of(
        st.text(),  # every code point: controls, surrogates, astral
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.lists(st.text(), max_size=4),
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
