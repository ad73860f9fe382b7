"""The queue file codec: round trip, and nothing but QueueFileError on hostile bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsmail.queuefile import (
    FAILED,
    INCOMING,
    STATES,
    TMP,
    Envelope,
    QueueFileError,
    decode,
    encode,
    valid_queue_id,
    write_durably,
)

addresses = st.text(min_size=1, max_size=40)
envelopes = st.builds(
    Envelope,
    sender=st.text(max_size=40),
    recipients=st.lists(addresses, min_size=1, max_size=5).map(tuple),
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


def test_write_durably_lands_in_incoming_only(tmp_path: Path) -> None:
    for state in STATES:
        (tmp_path / state).mkdir()
    data = encode(Envelope("a@tenant.test", ("b@rcpt.test",)), b"Subject: x\r\n\r\nhi\r\n")
    write_durably(tmp_path, "q1", data)
    assert (tmp_path / INCOMING / "q1").read_bytes() == data
    assert os.listdir(tmp_path / TMP) == [] and os.listdir(tmp_path / FAILED) == []
    with pytest.raises(ValueError):
        write_durably(tmp_path, "../escape", data)
