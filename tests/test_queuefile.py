"""The queue file codec: round trip, and nothing but QueueFileError on hostile bytes."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsmail.queuefile import Envelope, QueueFileError, decode, encode, valid_queue_id

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
    framed = b"NSMAIL-QUEUE 1\nenvelope %d\n%s\nbody 0\n\n" % (len(record), record)
    framed += b"end %s\n" % hashlib.sha256(framed).hexdigest().encode()
    with pytest.raises(QueueFileError):
        decode(framed)


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
    framed = b"NSMAIL-QUEUE 1\nenvelope %d\n%s\nbody 0\n\n" % (len(record), record)
    framed += b"end %s\n" % hashlib.sha256(framed).hexdigest().encode()
    with pytest.raises(QueueFileError):
        decode(framed)


def test_recipients_may_wait_for_extraction_before_clean_up() -> None:
    waiting = Envelope("a@tenant.test", (), extract=True)
    assert decode(encode(waiting, b"To: b@rcpt.test\r\n\r\n"))[0] == waiting
