"""The SMTP client protocol without IO: replies in, commands out, one state table.

Like h11 for HTTP: `Client` is fed the bytes the server sent (`receive`, `receive_eof`)
and hands out the bytes to write (`data_to_send`); it decides what is sent when (EHLO,
the HELO fallback, STARTTLS, pipelining groups, MAIL parameters, RSET after a failed
transaction), which reply answers which command, and what each reply means for each
recipient. It has no clock: the IO shell keeps each stage's deadline and says when one
passed (`timed_out`), and it does the TLS handshake when the state is HANDSHAKE. Every
state change goes through `_NEXT`, the one table of the protocol.

Security: everything the server sends is hostile: `ReplyReader` bounds it, a reply
nobody asked for (unsolicited text after the greeting, more replies than commands, data
after the reply to STARTTLS, which an attacker may have injected before the handshake)
ends the session, and a reply with a code the command cannot have (250 to DATA) never
passes for another one. Envelope addresses come from tenant-written queue files: a path
with control characters, spaces or angle brackets never reaches a command line.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from nsmail.core.smtp.reply import (
    Enhanced,
    Failure,
    Malformed,
    Reply,
    ReplyReader,
    Stage,
    dropped,
    refusal,
    timed_out,
    tls_failed,
    unsendable,
    violation,
)

# RFC 5321 4.1.2: no control characters, spaces or angle brackets inside a path.
_BAD_PATH = re.compile(r"[\x00-\x20\x7f<>]")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # RFC 5321 4.1.1.1 ehlo-keyword
_SIZE = re.compile(r"[0-9]{1,20}")  # RFC 1870 4: 1*20DIGIT (str.isdigit would take "²")
_POSITIVE = range(200, 300)  # RFC 5321 4.2.1: any 2yz completes a command


class TlsMode(StrEnum):
    """What the client does about STARTTLS (RFC 3207)."""

    NONE = "none"  # never
    MAY = "may"  # RFC 7435 opportunistic: when offered, any certificate; refused: in clear
    VERIFY = "verify"  # required, with a certificate the shell verifies; never in clear


@dataclass(frozen=True, slots=True)
class Extensions:
    """What the server's EHLO reply offers that this client uses."""

    pipelining: bool = False  # RFC 2920
    size: int | None = None  # RFC 1870: None when not offered, 0 when no limit is stated
    eight_bit_mime: bool = False  # RFC 6152
    smtputf8: bool = False  # RFC 6531
    starttls: bool = False  # RFC 3207


def parse_extensions(reply: Reply) -> Extensions:
    """The extensions a 250 reply to EHLO offers (RFC 5321 4.1.1.1: one per line after
    the first, keyword then parameters). A line that is no keyword is ignored, as is a
    SIZE parameter that is no number of at most 20 digits: the limit is then unknown."""
    offered: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, parameters = line.partition(" ")
        if keyword.isascii() and _KEYWORD.fullmatch(keyword):
            offered.setdefault(keyword.upper(), parameters.strip())
    size = offered.get("SIZE")
    return Extensions(
        pipelining="PIPELINING" in offered,
        size=None if size is None else int(size) if _SIZE.fullmatch(size) else 0,
        eight_bit_mime="8BITMIME" in offered,
        smtputf8="SMTPUTF8" in offered,
        starttls="STARTTLS" in offered,
    )


@dataclass(frozen=True, slots=True)
class Delivered:
    """The server took the message for a recipient: its reply to the final dot."""

    reply: Reply


Results = dict[str, Delivered | Failure]


class State(Enum):
    GREETING = "waiting for the greeting"
    EHLO = "waiting for the reply to EHLO"
    HELO = "waiting for the reply to HELO"
    STARTTLS = "waiting for the reply to STARTTLS"
    HANDSHAKE = "the shell does the TLS handshake"
    READY = "idle, between transactions"
    ENVELOPE = "waiting for replies to MAIL, RCPT and DATA"
    MESSAGE = "the shell sends the message"
    DOT = "waiting for the reply to the final dot"
    DECLINE = "waiting for the reply to a dot that ends a message with no recipients"
    RSET = "waiting for the reply to RSET"
    QUIT = "waiting for the reply to QUIT"
    CLOSED = "closed"


class Event(Enum):
    ACCEPTED = "the reply the command asks for"
    REFUSED = "a 4yz or 5yz reply the session survives"
    HELO = "EHLO refused with 5yz: try HELO (RFC 5321 4.1.4)"
    TLS_OFFERED = "STARTTLS offered and wanted"
    CLEAR = "STARTTLS refused; opportunistic TLS goes on in clear"
    TLS_UP = "the shell finished the handshake"
    BEGIN = "the caller starts a transaction"
    GO_AHEAD = "DATA answered 354 for accepted recipients"
    DECLINE = "DATA answered 354 although no recipient was accepted (RFC 2920 3.1)"
    ABORTED = "the transaction failed after MAIL was accepted: RSET (RFC 5321 4.1.1.5)"
    ENDED = "the transaction failed with none open (MAIL refused)"
    SENT = "the caller sent the message and the final dot"
    RESET = "the caller asks for RSET"
    QUIT = "the caller asks for QUIT"
    FAILED = "the session cannot go on: a timeout, a drop, a violation, a refusal"
    CLOSE = "the caller closed the connection"


_NEXT: dict[tuple[State, Event], State] = {
    (State.GREETING, Event.ACCEPTED): State.EHLO,
    (State.EHLO, Event.ACCEPTED): State.READY,
    (State.EHLO, Event.TLS_OFFERED): State.STARTTLS,
    (State.EHLO, Event.HELO): State.HELO,
    (State.HELO, Event.ACCEPTED): State.READY,
    (State.STARTTLS, Event.ACCEPTED): State.HANDSHAKE,
    (State.STARTTLS, Event.CLEAR): State.READY,
    (State.HANDSHAKE, Event.TLS_UP): State.EHLO,  # RFC 3207 4.2: EHLO again
    (State.READY, Event.BEGIN): State.ENVELOPE,
    (State.READY, Event.RESET): State.RSET,
    (State.READY, Event.QUIT): State.QUIT,
    (State.ENVELOPE, Event.GO_AHEAD): State.MESSAGE,
    (State.ENVELOPE, Event.DECLINE): State.DECLINE,
    (State.ENVELOPE, Event.ABORTED): State.RSET,
    (State.ENVELOPE, Event.ENDED): State.READY,
    (State.MESSAGE, Event.SENT): State.DOT,
    # RFC 5321 4.1.1.4: the reply to the final dot ends the transaction either way.
    (State.DOT, Event.ACCEPTED): State.READY,
    (State.DOT, Event.REFUSED): State.READY,
    (State.DECLINE, Event.ACCEPTED): State.READY,
    (State.DECLINE, Event.REFUSED): State.READY,
    (State.RSET, Event.ACCEPTED): State.READY,
    (State.QUIT, Event.ACCEPTED): State.CLOSED,
    **{(state, Event.FAILED): State.CLOSED for state in State if state is not State.CLOSED},
    **{(state, Event.CLOSE): State.CLOSED for state in State},
}
_STAGES = {
    State.GREETING: Stage.GREETING,
    State.EHLO: Stage.EHLO,
    State.HELO: Stage.HELO,
    State.STARTTLS: Stage.STARTTLS,
    State.HANDSHAKE: Stage.TLS,
    State.MESSAGE: Stage.MESSAGE,
    State.DOT: Stage.DOT,
    State.DECLINE: Stage.DOT,
    State.RSET: Stage.RSET,
    State.QUIT: Stage.QUIT,
}
_NOT_WAITING = (State.HANDSHAKE, State.READY, State.MESSAGE, State.CLOSED)
_BAD_RECIPIENT = Enhanced(5, 1, 3)  # RFC 3463 3.2: bad destination mailbox address syntax
_BAD_SENDER = Enhanced(5, 1, 7)  # RFC 3463 3.2: bad sender's mailbox address syntax
_TOO_BIG = Enhanced(5, 3, 4)  # RFC 3463 3.4: message too big for system
_NEEDS_UTF8 = Enhanced(5, 6, 7)  # RFC 6531 3.5: non-ASCII addresses not permitted


@dataclass(frozen=True, slots=True)
class _Command:
    stage: Stage
    line: bytes
    recipient: str = ""


@dataclass
class _Transaction:
    recipients: list[str]  # in the order given, without repeats
    unsent: deque[_Command]  # without PIPELINING: sent one reply at a time
    awaited: deque[_Command] = field(default_factory=deque)  # sent, reply not read yet
    results: Results = field(default_factory=dict)
    mail_accepted: bool = False
    accepted: list[str] = field(default_factory=list)  # RCPT answered 2yz
    go_ahead: bool = False  # DATA answered 354


class Client:
    """One SMTP session's protocol state, from the greeting to QUIT."""

    def __init__(self, ehlo: str, tls: TlsMode) -> None:
        self._name = ehlo.encode("ascii")  # an A-label or an address literal
        self.mode = tls
        self._reader = ReplyReader()
        self._out: list[bytes] = []
        self._transaction: _Transaction | None = None
        self.state = State.GREETING
        self.extensions = Extensions()
        self.encrypted = False
        self.failure: Failure | None = None  # why the session closed, if it failed
        self.replies = 0  # replies read so far: the shell waits for this to move
        self.transactions = 0  # MAIL commands sent

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def awaiting(self) -> Stage | None:
        """The stage whose reply the client waits for, or None when it waits for none."""
        return None if self.state in _NOT_WAITING else self._stage()

    def data_to_send(self) -> bytes:
        """The bytes to write now (a pipelined group is one piece)."""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def receive(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        try:
            self._reader.feed(data)
        except Malformed as e:
            self._fail(violation(self._stage(), str(e)))
            return
        while not self.closed and (reply := self._reader.next()) is not None:
            self.replies += 1
            self._take(reply)

    def receive_eof(self, detail: str = "connection closed by the server") -> None:
        """The connection ended: `detail` says how (closed, reset)."""
        if self.state is State.QUIT:
            self._go(Event.CLOSE)
        elif self.state is State.HANDSHAKE:
            self.tls_failed(detail)
        elif self.state is not State.CLOSED:
            middle = " in the middle of a reply" if self._reader.pending else ""
            self._fail(dropped(self._stage(), detail + middle))

    def timed_out(self, stage: Stage, seconds: float) -> None:
        if self.state is not State.CLOSED:
            self._fail(timed_out(stage, seconds))

    def tls_started(self) -> None:
        """The handshake succeeded: greet again, forgetting what was offered in clear
        (RFC 3207 4.2)."""
        self._go(Event.TLS_UP)
        self.encrypted = True
        self.extensions = Extensions()
        self._send(b"EHLO " + self._name)

    def tls_failed(self, detail: str) -> None:
        if self.state is not State.CLOSED:
            self._fail(tls_failed(Stage.TLS, f"TLS handshake failed: {detail}"))

    def begin(self, sender: str, recipients: Sequence[str], size: int, eight_bit: bool) -> None:
        """Start a transaction for a message of `size` octets (`eight_bit`: not ASCII).

        Recipients the client will not send to get their failure at once; if none is
        left, nothing is sent and `results` is ready. On a session the server closed
        while idle, every recipient gets the reason.
        """
        why_closed = self.failure if self.closed else None
        if why_closed is None:
            self._go(Event.BEGIN)  # a caller's mistake raises here, before anything changes
        order = list(dict.fromkeys(recipients))
        transaction = _Transaction(order, deque())
        self._transaction = transaction
        if why_closed is not None:
            self._settle(why_closed)
            return
        for recipient in order:
            if _BAD_PATH.search(recipient):
                failure = unsendable(Stage.RCPT, _BAD_RECIPIENT, "bad recipient address")
                transaction.results[recipient] = failure
        sendable = [r for r in order if r not in transaction.results]
        problem = self._unsendable(sender, sendable, size)
        if problem is not None:
            self._settle(problem)
        if problem is not None or not sendable:
            self._go(Event.ENDED)
            return
        utf8 = _needs_utf8(sender, sendable)
        encoding = "utf-8" if utf8 else "ascii"  # RFC 6531 3.2
        commands = [_Command(Stage.MAIL, self._mail(sender, size, eight_bit, utf8))]
        commands += [_Command(Stage.RCPT, f"RCPT TO:<{r}>".encode(encoding), r) for r in sendable]
        commands.append(_Command(Stage.DATA, b"DATA"))
        self.transactions += 1
        if self.extensions.pipelining:
            # RFC 2920 3.1: MAIL, every RCPT and DATA, the last command of a group, at once.
            self._send_group(commands)
        else:
            transaction.unsent.extend(commands[1:])
            self._send_group(commands[:1])

    def end_of_message(self) -> None:
        """The message is out but for its final dot, which `data_to_send` now holds."""
        self._go(Event.SENT)
        self._send(b".")

    def results(self) -> Results:
        """What happened to each recipient of the last transaction, in the given order."""
        transaction = self._transaction
        if transaction is None or self.state in (State.ENVELOPE, State.MESSAGE, State.DOT):
            raise RuntimeError("SMTP client: no settled transaction")
        return {r: transaction.results[r] for r in transaction.recipients}

    def reset(self) -> None:
        """RSET (RFC 5321 4.1.1.5): ends nothing open, but proves the session alive."""
        self._go(Event.RESET)
        self._send(b"RSET")

    def quit(self) -> None:
        self._go(Event.QUIT)
        self._send(b"QUIT")

    def close(self) -> None:
        """The caller closed the connection."""
        self._go(Event.CLOSE)
        self._out.clear()

    # --- replies --------------------------------------------------------------------

    def _take(self, reply: Reply) -> None:
        handler = _HANDLERS.get(self.state)
        if handler is not None:
            handler(self, reply)
        elif reply.code == 421:  # RFC 5321 3.8: a server closing an idle session says so
            self._fail(refusal(self._stage(), reply))
        else:
            self._fail(violation(self._stage(), f"unsolicited reply {_short(reply)}"))

    def _greeting(self, reply: Reply) -> None:
        if not self._judge(Stage.GREETING, reply, {220}, survivable=False):
            return
        if self._send(b"EHLO " + self._name):
            self._go(Event.ACCEPTED)

    def _ehlo(self, reply: Reply) -> None:
        if 500 <= reply.code <= 599:
            if self._send(b"HELO " + self._name):
                self._go(Event.HELO)
        elif self._judge(Stage.EHLO, reply, {250}, survivable=False):
            self.extensions = parse_extensions(reply)
            self._greeted(Stage.EHLO)

    def _helo(self, reply: Reply) -> None:
        if self._judge(Stage.HELO, reply, {250}, survivable=False):
            self._greeted(Stage.HELO)

    def _greeted(self, stage: Stage) -> None:
        if self.encrypted or self.mode is TlsMode.NONE:
            self._go(Event.ACCEPTED)
        elif self.extensions.starttls:
            if self._send(b"STARTTLS"):
                self._go(Event.TLS_OFFERED)
        elif self.mode is TlsMode.VERIFY:
            self._fail(tls_failed(stage, "TLS is required, but the server does not offer STARTTLS"))
        else:
            self._go(Event.ACCEPTED)

    def _starttls(self, reply: Reply) -> None:
        if 400 <= reply.code <= 599 and reply.code != 421:
            if self.mode is TlsMode.MAY:
                self._go(Event.CLEAR)  # RFC 3207 4: the client decides whether to go on
            else:
                words = f"TLS is required, but STARTTLS was refused: {reply.words}"
                self._fail(tls_failed(Stage.STARTTLS, words, reply))
        elif self._judge(Stage.STARTTLS, reply, {220}, survivable=False):
            if self._reader.pending:
                # RFC 3207 5: bytes that came in clear before the handshake, maybe injected
                # by a man in the middle, would be read as replies over TLS.
                self._fail(violation(Stage.STARTTLS, "data after the reply to STARTTLS"))
            else:
                self._go(Event.ACCEPTED)

    def _envelope(self, reply: Reply) -> None:
        transaction = self._ongoing()
        command = transaction.awaited.popleft()
        wanted = {354} if command.stage is Stage.DATA else _POSITIVE
        if not self._judge(command.stage, reply, wanted, survivable=True):
            return
        accepted = reply.code < 400
        if command.stage is Stage.MAIL:
            transaction.mail_accepted = accepted
            if not accepted:
                transaction.unsent.clear()
                self._settle(refusal(Stage.MAIL, reply))
        elif command.stage is Stage.RCPT and transaction.mail_accepted:
            if accepted:
                transaction.accepted.append(command.recipient)
            else:
                transaction.results[command.recipient] = refusal(Stage.RCPT, reply)
        elif command.stage is Stage.DATA:
            transaction.go_ahead = accepted
            if not accepted and transaction.mail_accepted:
                self._settle(refusal(Stage.DATA, reply))
        if transaction.awaited:
            return  # RFC 2920 3.1: every reply of a group is read, in order
        if transaction.unsent and (
            transaction.accepted or transaction.unsent[0].stage is Stage.RCPT
        ):
            self._send_group([transaction.unsent.popleft()])
        else:
            transaction.unsent.clear()
            self._envelope_done(transaction)

    def _envelope_done(self, transaction: _Transaction) -> None:
        if transaction.go_ahead and transaction.mail_accepted and transaction.accepted:
            self._go(Event.GO_AHEAD)
        elif transaction.go_ahead:
            if self._send(b"."):  # RFC 2920 3.1: a 354 with nothing to send: a lone dot
                self._go(Event.DECLINE)
        elif transaction.mail_accepted:
            if self._send(b"RSET"):  # RFC 5321 4.1.1.5: clear the half-done transaction
                self._go(Event.ABORTED)
        else:
            self._go(Event.ENDED)

    def _dot(self, reply: Reply) -> None:
        if self._judge(Stage.DOT, reply, _POSITIVE, survivable=True):
            accepted = reply.code in _POSITIVE
            result: Delivered | Failure = (
                Delivered(reply) if accepted else refusal(Stage.DOT, reply)
            )
            self._settle(result)
            self._go(Event.ACCEPTED if accepted else Event.REFUSED)

    def _decline(self, reply: Reply) -> None:
        if self._judge(Stage.DOT, reply, _POSITIVE, survivable=True):
            self._go(Event.ACCEPTED if reply.code in _POSITIVE else Event.REFUSED)

    def _rset(self, reply: Reply) -> None:
        if self._judge(Stage.RSET, reply, _POSITIVE, survivable=True):
            if reply.code in _POSITIVE:
                self._go(Event.ACCEPTED)
            else:
                self._fail(refusal(Stage.RSET, reply))

    def _quit(self, reply: Reply) -> None:
        self._go(Event.ACCEPTED)

    # --- helpers --------------------------------------------------------------------

    def _judge(
        self, stage: Stage, reply: Reply, wanted: Container[int], *, survivable: bool
    ) -> bool:
        """Whether the session goes on after `reply`: a wanted code, or, if `survivable`,
        a 4yz or 5yz other than 421 (the caller tells those apart). Else it fails here."""
        refused = 400 <= reply.code <= 599
        if reply.code in wanted or (survivable and refused and reply.code != 421):
            return True
        if refused:  # 421: RFC 5321 3.8, the server closes the channel
            self._fail(refusal(stage, reply))
        else:  # e.g. 250 to DATA (RFC 5321 4.3.2: 354, 4yz or 5yz only)
            self._fail(violation(stage, f"{_short(reply)} in reply to {stage.value}"))
        return False

    def _unsendable(self, sender: str, recipients: list[str], size: int) -> Failure | None:
        if _BAD_PATH.search(sender):
            return unsendable(Stage.MAIL, _BAD_SENDER, "bad sender address")
        limit = self.extensions.size
        if limit and size > limit:  # RFC 1870 6.1: over the stated maximum is permanent
            words = f"message size {size} exceeds the server's limit of {limit}"
            return unsendable(Stage.MAIL, _TOO_BIG, words)
        if _needs_utf8(sender, recipients) and not self.extensions.smtputf8:
            # RFC 6531 3.2: such addresses never go without the extension.
            words = "the addresses need SMTPUTF8, which the server does not offer"
            return unsendable(Stage.MAIL, _NEEDS_UTF8, words)
        return None

    def _mail(self, sender: str, size: int, eight_bit: bool, utf8: bool) -> bytes:
        offered = self.extensions
        parameters = []
        if offered.size is not None:
            parameters.append(f" SIZE={size}")  # RFC 1870 3: an estimate is fine
        if eight_bit and offered.eight_bit_mime:
            parameters.append(" BODY=8BITMIME")  # RFC 6152 2
        if utf8:
            parameters.append(" SMTPUTF8")  # RFC 6531 3.4
        line = f"MAIL FROM:<{sender}>" + "".join(parameters)
        return line.encode("utf-8" if utf8 else "ascii")

    def _send(self, line: bytes) -> bool:
        return self._send_group([_Command(self._stage(), line)], awaited=False)

    def _send_group(self, commands: list[_Command], awaited: bool = True) -> bool:
        """Queue `commands` for one write, unless the server has spoken out of turn."""
        if self._reader.pending:
            # Bytes that came before the command cannot be its reply: the client speaks,
            # the server answers (RFC 5321 4.3.1: "an alternating dialogue").
            self._fail(violation(self._stage(), "reply before the command"))
            return False
        self._out.extend(command.line + b"\r\n" for command in commands)
        if awaited:
            self._ongoing().awaited.extend(commands)
        return True

    def _settle(self, result: Delivered | Failure) -> None:
        """`result` for every recipient of the transaction that has none yet."""
        transaction = self._transaction
        if transaction is not None:
            for recipient in transaction.recipients:
                transaction.results.setdefault(recipient, result)

    def _fail(self, failure: Failure) -> None:
        self.failure = failure
        if self.state in (State.ENVELOPE, State.MESSAGE, State.DOT):
            self._settle(failure)
        self._out.clear()
        self._go(Event.FAILED)

    def _go(self, event: Event) -> None:
        try:
            self.state = _NEXT[self.state, event]
        except KeyError:
            raise RuntimeError(f"SMTP client: {event.name} while {self.state.value}") from None

    def _stage(self) -> Stage:
        if self.state is State.ENVELOPE:
            awaited = self._ongoing().awaited
            return awaited[0].stage if awaited else Stage.MAIL
        return _STAGES.get(self.state, Stage.IDLE)

    def _ongoing(self) -> _Transaction:
        assert self._transaction is not None, "no transaction"
        return self._transaction


_HANDLERS = {
    State.GREETING: Client._greeting,
    State.EHLO: Client._ehlo,
    State.HELO: Client._helo,
    State.STARTTLS: Client._starttls,
    State.ENVELOPE: Client._envelope,
    State.DOT: Client._dot,
    State.DECLINE: Client._decline,
    State.RSET: Client._rset,
    State.QUIT: Client._quit,
}


def _needs_utf8(sender: str, recipients: list[str]) -> bool:
    return not (sender.isascii() and all(r.isascii() for r in recipients))


def _short(reply: Reply) -> str:
    words = reply.words
    return repr(words if len(words) <= 60 else words[:57] + "...")
