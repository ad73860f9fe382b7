"""The hand-off requests and answers (nsmail.core.handoff): strict one way, safe the other."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsmail.core.handoff import (
    MAILBOX,
    POSTMASTER,
    Answer,
    HandoffError,
    Request,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
)
from nsmail.core.outcome import Status


def test_a_request_round_trips() -> None:
    for request in (Request(MAILBOX, "root", "root@abc.test"), Request(POSTMASTER, "", "")):
        assert decode_request(encode_request(request)) == request


@pytest.mark.parametrize(
    "data",
    [
        b'{"kind":"mailbox","user":"../etc/passwd","sender":""}',
        b'{"kind":"mailbox","user":"","sender":""}',
        b'{"kind":"postmaster","user":"root","sender":""}',
        b'{"kind":"shell","user":"","sender":""}',
        b'{"kind":"postmaster","user":"","sender":"a\\nb"}',
        b'{"kind":"postmaster","user":""}',
        b'{"kind":"postmaster","user":"","sender":"","more":1}',
        b"[]",
        b"\xff",
        b"{" * 5000,
    ],
)
def test_anything_but_a_request_is_refused(data: bytes) -> None:
    with pytest.raises(HandoffError):
        decode_request(data)


@given(st.binary(max_size=2000))
def test_garbage_raises_only_handoff_error(data: bytes) -> None:
    with contextlib.suppress(HandoffError):
        decode_request(data)


def test_answers() -> None:
    done = "2.0.0 delivered to the mailbox of root"
    assert decode_answer(encode_answer(done)) == Answer(Status.DELIVERED, done)
    assert decode_answer(b"5.1.1 no such user here: x").status == Status.PERMANENT
    for nothing in (b"", b"ok", b"2.0.0 \x1b[2J", b"9.9.9 x"):
        assert decode_answer(nothing) == Answer(
            Status.TEMPORARY, "4.3.0 the hand-off ended without an answer"
        )
