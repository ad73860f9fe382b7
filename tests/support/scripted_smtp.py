"""A scripted SMTP server for the fuzzers: on 127.0.0.1, it answers each stage of a session
from a script (else happily) and keeps a transcript of what it was asked and what it said;
hypothesis strategies for hostile scripts; and the oracle that judges a client's outcomes
by the transcript alone, never by the client's own guesses.

Replies are right and wrong codes, multi-line replies with mixed codes, over-long lines,
NUL and 8-bit text, early closes, EHLO extensions with hostile values, STARTTLS advertised
but broken.
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import strategies as st

from nsmail.core.config import SmtpTimeouts
from nsmail.core.message import Message
from nsmail.core.outcome import Outcome, Status

MESSAGE = Message.of(b"Subject: fuzz\n\nhello\n.dot\n")
STAGES = ("greeting", "EHLO", "HELO", "STARTTLS", "MAIL", "RCPT", "DATA", "DOT", "RSET")
HAPPY = {
    "greeting": b"220 mx.rcpt.test ESMTP\r\n",
    "EHLO": b"250-mx.rcpt.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n",
    "HELO": b"250 mx.rcpt.test\r\n",
    "STARTTLS": b"454 4.7.0 TLS not available\r\n",
    "MAIL": b"250 2.1.0 ok\r\n",
    "RCPT": b"250 2.1.5 ok\r\n",
    "DATA": b"354 go ahead\r\n",
    "DOT": b"250 2.0.0 queued\r\n",
    "RSET": b"250 2.0.0 ok\r\n",
    "NOOP": b"250 2.0.0 ok\r\n",
    "QUIT": b"221 2.0.0 bye\r\n",
}
# RFC 5321 4.2: a reply line is a code, then "-" (more lines follow), SP or nothing.
_STRICT_LINE = re.compile(rb"([2-5][0-9][0-9])([- ][^\r\n]*)?")
_EXTENSION = re.compile(rb"[2-5][0-9][0-9][- ]SIZE ([0-9]{1,20})\r\n", re.IGNORECASE)


def final_code(reply: bytes) -> int | None:
    """The code of `reply` if it is exactly one well-formed reply (RFC 5321 4.2.1: every
    line carries the same code, all but the last one with "-"), else None. A bare LF ends
    a line too, as it does for smtplib and Postfix; a line of more than 8 KiB (smtplib's
    limit; RFC 5321 4.5.3.1.5 says 512 octets) makes the reply malformed."""
    lines = re.split(rb"\r?\n", reply)
    if len(lines) < 2 or lines[-1] != b"" or any(len(line) > 8190 for line in lines):
        return None
    matches = [_STRICT_LINE.fullmatch(line) for line in lines[:-1]]
    if not all(matches) or len({m[1] for m in matches if m}) != 1:
        return None
    if any((line[3:4] == b"-") != (i < len(lines) - 2) for i, line in enumerate(lines[:-1])):
        return None
    return int(lines[0][:3])


@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes
    close: bool = False  # the server hangs up right after sending `data`


@dataclass(frozen=True, slots=True)
class Event:
    connection: int
    stage: str
    argument: bytes  # the client's command line after the verb
    reply: Reply


@dataclass
class ScriptedServer:
    """An SMTP server on 127.0.0.1 answering each stage from `script`, else happily."""

    script: dict[str, list[Reply]] = field(default_factory=dict)
    transcript: list[Event] = field(default_factory=list)
    flood: bool = False  # answer EHLO with continuation lines until the client leaves

    def __post_init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def reset(self, script: dict[str, list[Reply]]) -> None:
        with self._lock:
            self.script = {stage: list(replies) for stage, replies in script.items()}
            self.transcript = []

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self._connections += 1
            number = self._connections
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _next(self, connection: int, stage: str, argument: bytes) -> Reply:
        with self._lock:
            pending = self.script.get(stage)
            reply = pending.pop(0) if pending else Reply(HAPPY[stage], close=stage == "QUIT")
            self.transcript.append(Event(connection, stage, argument, reply))
        return reply

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(10)
        lines = _Lines(conn)
        with contextlib.suppress(OSError), conn:
            if not self._send(conn, self._next(number, "greeting", b"")):
                return
            while (line := lines.next()) is not None:
                verb, _, argument = line.rstrip(b"\r\n").partition(b" ")
                stage = verb.upper().decode("latin-1")
                if stage not in HAPPY or stage == "greeting":
                    stage = "NOOP"
                if stage == "EHLO" and self.flood:
                    self._flood(conn)
                    return
                reply = self._next(number, stage, argument)
                if not self._send(conn, reply):
                    return
                if stage == "STARTTLS" and final_code(reply.data) == 220:
                    return  # no TLS here: the handshake fails on the closed connection
                if stage == "DATA" and final_code(reply.data) == 354:
                    dot = self._next(number, "DOT", b"") if lines.until_dot() else None
                    if dot is None or not self._send(conn, dot):
                        return

    def _send(self, conn: socket.socket, reply: Reply) -> bool:
        conn.sendall(reply.data)
        return not reply.close

    def _flood(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self._stop.is_set():
            conn.sendall(b"250-still here\r\n")
            time.sleep(0.005)


class _Lines:
    """CRLF-terminated lines from a socket."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""

    def next(self) -> bytes | None:
        while b"\n" not in self.buffer:
            chunk = self.conn.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def until_dot(self) -> bool:
        """Skip the message up to its final dot line; False at end of file."""
        while (line := self.next()) is not None:
            if line == b".\r\n":
                return True
        return False


# --- strategies ------------------------------------------------------------------------

CODES = st.sampled_from(
    [220, 221, 250, 251, 252, 354, 421, 450, 451, 452, 500, 550, 552, 553, 554, 199, 600, 999]
)
TEXT = st.one_of(
    st.just(b"ok"),
    st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.text(max_size=10).map(lambda t: t.encode("utf-8", "surrogatepass")),
).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
GARBAGE_LINES = st.sampled_from(
    [b"2x0 ok", b"", b"25", b"abc", b" 250 ok", b"+25 ok", b"250", b"2500 ok", b"\x00\x00\x00"]
)


@st.composite
def one_line(draw: st.DrawFn) -> bytes:
    return b"%d %s\r\n" % (draw(CODES), draw(TEXT))


@st.composite
def multi_line(draw: st.DrawFn) -> bytes:
    codes = draw(st.lists(CODES, min_size=2, max_size=4))
    mixed = draw(st.booleans())
    codes = codes if mixed else [codes[0]] * len(codes)
    lines = [b"%d-%s\r\n" % (code, draw(TEXT)) for code in codes[:-1]]
    return b"".join(lines) + b"%d %s\r\n" % (codes[-1], draw(TEXT))


HOSTILE_DATA = st.one_of(
    one_line(),
    multi_line(),
    GARBAGE_LINES.map(lambda line: line + b"\r\n"),
    st.tuples(CODES, TEXT).map(lambda ct: b"%d %s\n" % ct),  # bare LF
    st.just(b"250 " + b"x" * 9000 + b"\r\n"),  # longer than smtplib's 8 KiB line
    st.just(b"550-" + b"y" * 600 + b"\r\n550 " + "\u4e00".encode() * 200 + b"\r\n"),
    multi_line().map(lambda r: r.replace(b"\r\n", b"\r\ngarbage\r\n", 1)),
)
# Silence costs a timeout per example: test_a_silent_or_endless_server... has it instead.
REPLIES = st.one_of(
    st.builds(Reply, HOSTILE_DATA, st.booleans()),
    st.builds(Reply, st.sampled_from([b"", b"2", b"25", b"250 o"]), st.just(True)),  # cut off
    st.integers(1, 60).map(lambda n: Reply(b"250-more\r\n" * n, close=True)),  # never ends
)
EXTENSIONS = st.sampled_from(
    [
        b"SIZE",
        b"SIZE -1",
        b"SIZE 0",
        b"SIZE 10",  # smaller than the message: a permanent refusal (RFC 1870 6.1)
        b"SIZE 99999999999999999999999999",
        b"SIZE " + b"9" * 5000,
        b"SIZE abc",
        b"SIZE \xb2",  # a superscript two in latin-1: str.isdigit says yes
        b"SIZE 1e9",
        b"STARTTLS",
        b"8BITMIME",
        b"SMTPUTF8",
        b"AUTH PLAIN",
        b"\xff\xfe\x00",
        b"X-" + b"A" * 300,
    ]
)


@st.composite
def hostile_ehlo(draw: st.DrawFn) -> Reply:
    extensions = draw(st.lists(EXTENSIONS, min_size=1, max_size=4))
    lines = [b"250-mx.rcpt.test\r\n", *(b"250-%s\r\n" % e for e in extensions[:-1])]
    return Reply(b"".join(lines) + b"250 %s\r\n" % extensions[-1])


SCRIPTS = st.dictionaries(
    st.sampled_from(STAGES), st.lists(REPLIES, min_size=1, max_size=3), max_size=3
).flatmap(
    lambda script: st.one_of(st.just(script), hostile_ehlo().map(lambda e: {**script, "EHLO": [e]}))
)
MESSAGES = st.lists(st.integers(1, 3), min_size=1, max_size=2)  # recipients per message

# Servers that never finish a reply, and the outcome at the deadline (or the bound on a
# reply's lines); with an empty script the server floods continuation lines.
SILENT_OR_ENDLESS = [
    pytest.param({"greeting": [Reply(b"")]}, Status.TEMPORARY, id="greeting-never-comes"),
    pytest.param(
        {"MAIL": [Reply(b"250-one line, then silence\r\n")]},
        Status.TEMPORARY,
        id="stall-mid-reply",
    ),
    # Opportunistic TLS: the handshake fails at its deadline; the clear-text retry delivers.
    pytest.param(
        {"EHLO": [Reply(b"250-mx\r\n250 STARTTLS\r\n")], "STARTTLS": [Reply(b"220 go\r\n")]},
        Status.DELIVERED,
        id="starttls-then-nothing",
    ),
    pytest.param({}, Status.TEMPORARY, id="continuation-flood"),
]


# --- the oracle -------------------------------------------------------------------------


@dataclass
class Transaction:
    """One MAIL ... (DATA, dot) sequence as the server saw it."""

    connection: int
    sender: str
    mail: Reply
    rcpts: dict[str, Reply] = field(default_factory=dict)
    data: Reply | None = None
    dot: Reply | None = None
    clean: bool = True  # every reply of the connection so far well formed, no hang-up


def transactions(transcript: list[Event]) -> list[Transaction]:
    found: list[Transaction] = []
    clean: dict[int, bool] = {}
    current: dict[int, Transaction] = {}
    for event in transcript:
        ok = clean.get(event.connection, True)
        ok = ok and not event.reply.close and final_code(event.reply.data) is not None
        clean[event.connection] = ok
        path = event.argument.partition(b"<")[2].partition(b">")[0].decode("latin-1")
        if event.stage == "MAIL":
            current[event.connection] = Transaction(event.connection, path, event.reply)
            found.append(current[event.connection])
        elif event.connection not in current:
            continue
        elif event.stage == "RCPT":
            current[event.connection].rcpts[path] = event.reply
        elif event.stage == "DATA":
            current[event.connection].data = event.reply
        elif event.stage == "DOT":
            current[event.connection].dot = event.reply
        if event.connection in current and event.stage in ("MAIL", "RCPT", "DATA", "DOT"):
            current[event.connection].clean = ok
    return found


def code_class(reply: Reply | None) -> int | None:
    code = final_code(reply.data) if reply is not None else None
    return None if code is None else code // 100


def check(
    outcomes: list[Outcome], sender: str, recipients: tuple[str, ...], transcript: list[Event]
) -> None:
    assert [o.recipient for o in outcomes] == list(recipients)
    mine = [t for t in transactions(transcript) if t.sender == sender]
    small_size = [
        int(size)
        for e in transcript
        if e.stage == "EHLO" and final_code(e.reply.data) == 250
        for size in _EXTENSION.findall(e.reply.data)
    ]
    for o in outcomes:
        assert isinstance(o.status, Status), o
        seen = [t for t in mine if o.recipient in t.rcpts]
        if o.status == Status.DELIVERED:
            # Never delivered unless the server took this recipient and a 2yz followed the dot.
            assert any(
                code_class(t.rcpts[o.recipient]) == 2
                and final_code(t.data.data if t.data else b"") == 354
                and code_class(t.dot) == 2
                for t in seen
            ), (o, transcript)
        if o.status == Status.PERMANENT:
            # Only a well-formed 5yz refuses for good (or a stated SIZE that is too small,
            # nsmail's own refusal: no reply code).
            too_big = o.code is None and o.text.startswith("5.3.4 ")
            assert any(
                5 in (code_class(t.mail), code_class(t.data), code_class(t.dot))
                or code_class(t.rcpts.get(o.recipient)) == 5
                for t in mine
            ) or (too_big and any(0 < s < MESSAGE.size for s in small_size)), (o, transcript)
        last = seen[-1] if seen else None
        if last is not None and last.clean and code_class(last.rcpts[o.recipient]) == 5:
            assert o.status == Status.PERMANENT, (o, transcript)  # RFC 5321 4.2.1: 5yz


def harmless(script: dict[str, list[Reply]]) -> bool:
    """Whether every reply would be the happy one, up to EHLO extensions a client may ignore."""
    ehlo = script.get("EHLO", [])
    if set(script) - {"EHLO"} or any(final_code(r.data) != 250 or r.close for r in ehlo):
        return False
    data = b"".join(r.data for r in ehlo)
    sizes = [int(s) for s in _EXTENSION.findall(data)]
    return b"STARTTLS" not in data and not any(0 < s < MESSAGE.size for s in sizes)


@functools.cache
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(opportunistic, verifying); made once, as loading the CA store takes a while."""
    opportunistic = ssl.create_default_context()
    opportunistic.check_hostname = False
    opportunistic.verify_mode = ssl.CERT_NONE
    return opportunistic, ssl.create_default_context()


def timeouts(seconds: float) -> SmtpTimeouts:
    """Every SMTP stage `seconds`: the scripted server stalls for less than a minute."""
    return SmtpTimeouts(**dict.fromkeys(SmtpTimeouts.__dataclass_fields__, seconds))
