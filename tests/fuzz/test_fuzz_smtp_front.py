"""Hostile clients of the SMTP server core as the listeners use it, fuzzed: the front's
policy (STARTTLS, AUTH before MAIL) and the network's (no bare LF or CR in DATA).

Whatever the client sends, in whatever pieces: the core raises nothing, every reply is a
well-formed line, no MAIL reaches the caller before a successful AUTH, no AUTH before
TLS, nothing sent after STARTTLS counts before the handshake, and no message that holds
a bare LF or CR is handed over for storing.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from nsmail.core.smtp import auth
from nsmail.core.smtp.server import (
    NEED_DATA,
    Aborted,
    Authenticate,
    Closed,
    Content,
    EndOfMessage,
    Mail,
    Output,
    Policy,
    Reply,
    Server,
    StartTls,
)

REPLY = re.compile(rb"[2345]\d\d[ -][ -~]*\r\n")
WORDS = [
    b"EHLO c.test\r\n",
    b"HELO c.test\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN " + auth.encode_plain("a@bcd.test", "pw").encode() + b"\r\n",
    b"AUTH LOGIN\r\n",
    b"YUBiY2QudGVzdA==\r\n",
    b"*\r\n",
    b"MAIL FROM:<a@bcd.test>\r\n",
    b"RCPT TO:<x@rcpt.test>\r\n",
    b"DATA\r\n",
    b"hello\r\n",
    b"bare\nlf\r\n",
    b"bare\rcr\r\n",
    b".\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
]
chunks = st.lists(st.one_of(st.sampled_from(WORDS), st.binary(max_size=40)), max_size=40)


@settings(max_examples=400, deadline=None)
@given(chunks, st.booleans(), st.booleans())
def test_the_front_and_network_policies_hold_whatever_the_client_sends(
    pieces: list[bytes], implicit: bool, good_password: bool
) -> None:
    server = Server(
        "abc.test",
        policy=Policy(starttls=not implicit, tls=implicit, auth=True, bare_newlines=False),
    )
    output = b""
    content = b""
    awaiting_tls = False
    for piece in [*pieces, b""]:
        server.receive(piece)
        while (event := server.next_event()) is not NEED_DATA:
            if isinstance(event, Output):
                output += event.data
                continue
            if isinstance(event, Closed):
                break
            if isinstance(event, Mail):
                assert server.authenticated
            if isinstance(event, Authenticate):
                assert server.tls
            if isinstance(event, StartTls):
                assert not server.tls
                awaiting_tls = True
            if isinstance(event, Content):
                content += event.data
                continue
            if isinstance(event, Aborted):
                content = b""
                continue
            if isinstance(event, EndOfMessage):
                unstuffed = content.replace(b"\r\n", b"")
                assert b"\n" not in unstuffed and b"\r" not in unstuffed
                content = b""
            refused = isinstance(event, Authenticate) and not good_password
            server.answer(Reply(535, "5.7.8 no") if refused else None)
        if awaiting_tls:  # the handshake, as the front does it once the reply is out
            server.tls_started()
            awaiting_tls = False
        if server.state.value == "closed":
            break
    assert all(REPLY.fullmatch(line) for line in output.splitlines(keepends=True))
