"""SMTP replies and failures: reading replies with bounds, and what a failure means.

`ReplyReader` turns the bytes a server sends into `Reply` values (RFC 5321 4.2), each with
its enhanced status code (RFC 3463) parsed once, here. `Failure` carries everything known
about something that went wrong in a session, for one recipient or all of them: permanent
or not, the stage, the kind, the reply if there was one, the enhanced code; `words` is
what a person reads in a log line or a bounce. Its properties are the classification a
scheduler needs: slow down, connection-level, try the other address family.

Security: replies come from remote servers and are hostile until parsed. A reply is held
to `MAX_LINE` octets a line, `MAX_LINES` lines and `MAX_REPLY` octets in all, checked as
the bytes arrive (a server sending continuation lines for ever is caught at the bound,
not when it stops); every line must carry the first line's code. Reply text is decoded
as UTF-8 with replacement and may hold any other character: escape it for a log line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

# smtplib's limit, which the first release kept: RFC 5321 4.5.3.1.5 says 512 octets, but
# servers send longer lines, and a client must accept what it can (4.5.3.1).
MAX_LINE = 8192  # octets, line end included
MAX_LINES = 100  # far more than the longest EHLO reply
MAX_REPLY = 65536  # octets: 100 lines of 8 KiB would be 800 KiB per session
# RFC 5321 4.2: the code, then "-" if more lines follow, else SP and text or nothing. A bare
# LF ends a line too, as it does for smtplib and Postfix; a CR inside a line does not.
_LINE = re.compile(rb"([2-5][0-9][0-9])(?:[- ][^\r\n]*)?\r?\n")
# RFC 3463 2: class "." subject "." detail, 1*3 digits each, then SP or the end of the text.
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?= |$)")


class Malformed(Exception):
    """The server's bytes are not SMTP replies: the session cannot go on."""


@dataclass(frozen=True, slots=True)
class Enhanced:
    """An RFC 3463 enhanced status code, class.subject.detail."""

    klass: int
    subject: int
    detail: int

    def __str__(self) -> str:
        return f"{self.klass}.{self.subject}.{self.detail}"


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete reply: its code, the text of each line, and its enhanced code if any."""

    code: int
    lines: tuple[str, ...]  # after the code and its separator, trailing blanks removed
    enhanced: Enhanced | None

    @property
    def text(self) -> str:
        """The lines as one, without the enhanced code each continuation line repeats."""
        repeated = str(self.enhanced) if self.enhanced else None
        rest = [_without(repeated, line) for line in self.lines[1:]]
        return " ".join(part for part in (self.lines[0], *rest) if part)

    @property
    def words(self) -> str:
        return f"{self.code} {self.text}".rstrip()


def _without(code: str | None, line: str) -> str:
    """`line` without the enhanced code `code` opening it."""
    if code is None:
        return line
    return "" if line == code else line.removeprefix(code + " ")


def enhanced_code(code: int, first_line: str) -> Enhanced | None:
    """The enhanced code opening `first_line` of a reply with `code`, if it has one.

    RFC 3463 2 / RFC 2034 4: its class must be the reply's, or it is text, not a code.
    """
    found = _ENHANCED.match(first_line)
    if found is None or int(found[1]) != code // 100:
        return None
    return Enhanced(int(found[1]), int(found[2]), int(found[3]))


class ReplyReader:
    """Bytes in, in any pieces; complete replies out, in order (sans-IO).

    Only the line being received is kept as bytes; complete lines of an unfinished reply
    are checked and kept as text, so a server trickling a reply byte by byte costs one
    scan of each byte.
    """

    def __init__(self) -> None:
        self._partial = b""  # an unfinished line
        self._lines: list[tuple[int, str]] = []  # (code, text) of the unfinished reply
        self._size = 0  # octets of the unfinished reply so far
        self._done: list[Reply] = []
        self._broken: str | None = None

    @property
    def pending(self) -> bool:
        """Whether any byte was received that is not part of a reply handed out yet."""
        return bool(self._partial or self._lines or self._done)

    def feed(self, data: bytes) -> None:
        """Take `data`; raises `Malformed` as soon as the bytes break a rule or a bound."""
        if self._broken is not None:
            raise Malformed(self._broken)
        try:
            self._feed(data)
        except Malformed as e:
            self._broken = str(e)
            raise

    def next(self) -> Reply | None:
        """The oldest complete reply not handed out yet, if any."""
        return self._done.pop(0) if self._done else None

    def _feed(self, data: bytes) -> None:
        buffer = self._partial + data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            self._line(buffer[start : end + 1])
            start = end + 1
        self._partial = buffer[start:]
        if len(self._partial) >= MAX_LINE:
            raise Malformed(f"reply line longer than {MAX_LINE} octets")
        if self._size + len(self._partial) > MAX_REPLY:
            raise Malformed(f"reply longer than {MAX_REPLY} octets")

    def _line(self, line: bytes) -> None:
        if len(line) > MAX_LINE:
            raise Malformed(f"reply line longer than {MAX_LINE} octets")
        match = _LINE.fullmatch(line)
        if match is None:
            raise Malformed(f"malformed reply line {_shown(line)}")
        code = int(match[1])
        if self._lines and code != self._lines[0][0]:
            # RFC 5321 4.2.1: every line of a reply has the same code. Where the next reply
            # starts is unknown now, so nothing after this can be trusted.
            raise Malformed(f"reply lines with different codes ({self._lines[0][0]}, {code})")
        self._size += len(line)
        if self._size > MAX_REPLY:
            raise Malformed(f"reply longer than {MAX_REPLY} octets")
        text = line[4:].rstrip(b" \t\r\n").decode("utf-8", "replace")
        self._lines.append((code, text))
        if line[3:4] == b"-":
            if len(self._lines) >= MAX_LINES:
                raise Malformed(f"reply of more than {MAX_LINES} lines")
            return
        texts = tuple(text for _, text in self._lines)
        self._done.append(Reply(code, texts, enhanced_code(code, texts[0])))
        self._lines = []
        self._size = 0


def _shown(line: bytes) -> str:
    """The start of a bad line, for a person: printable ASCII, the rest as escapes."""
    return repr(line[:60])[1:]  # b'...' without the b


class Stage(StrEnum):
    """Where in a session something happened: the command whose reply was awaited,
    or what the client was doing."""

    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    TLS = "TLS handshake"
    IDLE = "idle"  # a kept session between transactions
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    MESSAGE = "message"  # sending the message's data blocks
    DOT = "end of data"  # the final dot
    RSET = "RSET"
    QUIT = "QUIT"

    @property
    def activity(self) -> str:
        """What the client was doing in this stage, in words."""
        return _ACTIVITIES.get(self, f"waiting for the reply to {self.value}")

    @property
    def context(self) -> str:
        """What a reply in this stage answered, in words."""
        return _CONTEXTS.get(self, f"in reply to {self.value}")


_ACTIVITIES = {
    Stage.CONNECT: "connecting",
    Stage.GREETING: "waiting for the greeting",
    Stage.TLS: "in the TLS handshake",
    Stage.IDLE: "while the session was idle",
    Stage.MESSAGE: "sending the message",
    Stage.DOT: "waiting for the reply to the end of the message",
}

_CONTEXTS = {
    Stage.GREETING: "as its greeting",
    Stage.IDLE: "while the session was idle",
    Stage.MESSAGE: "while the message was being sent",
}


class Kind(StrEnum):
    """What kind of failure: how it happened, not what it means for the mail."""

    REFUSED = "refused"  # no connection: refused, unreachable, or the source not bindable
    TIMEOUT = "timeout"  # a stage's deadline passed
    DROPPED = "dropped"  # the server closed or reset the connection
    TLS = "tls"  # the handshake failed, or TLS is required and cannot be had
    PROTOCOL = "protocol"  # the server broke RFC 5321: malformed, unsolicited, wrong code
    REPLY = "reply"  # the server refused, with a well-formed 4yz or 5yz reply
    UNSENDABLE = "unsendable"  # the client will not send it: over SIZE, needs SMTPUTF8, bad path


# RFC 3463 3.5: X.4.1 no answer from host, X.4.2 bad connection; 3.6: X.5.0 protocol;
# 3.8: X.7.5 cryptographic failure (Postfix uses the same for its TLS failures).
_NO_ANSWER = Enhanced(4, 4, 1)
_BAD_CONNECTION = Enhanced(4, 4, 2)
_PROTOCOL = Enhanced(4, 5, 0)
_CRYPTO = Enhanced(4, 7, 5)
_TLS_NOT_OFFERED = Enhanced(4, 7, 4)  # X.7.4 security features not supported


@dataclass(frozen=True, slots=True)
class Failure:
    """Everything known about one failure; the same value for each recipient it hit."""

    kind: Kind
    stage: Stage
    permanent: bool  # the server (or a rule it stated) says another try will fail too
    enhanced: Enhanced  # the reply's, or one RFC 3463 gives for what happened
    reply: Reply | None = None
    detail: str = ""  # what else is known, in words: the OS error, what was malformed
    seconds: float | None = None  # the deadline that passed, for a timeout

    @property
    def words(self) -> str:
        """One line for a log or a bounce, e.g. "timed out after 300 s waiting for the
        greeting" or "550 5.1.1 no such user (in reply to RCPT TO)"."""
        if self.kind is Kind.REPLY and self.reply is not None:
            return f"{self.reply.words} ({self.stage.context})"
        if self.kind is Kind.TIMEOUT:
            return f"timed out after {self.seconds:g} s {self.stage.activity}"
        if self.kind is Kind.DROPPED:
            return f"{self.detail} {_while(self.stage)}"
        if self.kind is Kind.PROTOCOL:
            return f"protocol violation {_while(self.stage)}: {self.detail}"
        return self.detail

    @property
    def slow_down(self) -> bool:
        """Whether the server asks the client to send less, or less often: a reason to
        narrow the destination's window, not to give up on the mail.

        421 at any stage (RFC 5321 3.8: the server is closing the channel; Gmail's
        "421 4.7.0 Try again later, closing connection", Yahoo's "421 4.7.0 [TSS04]
        Messages temporarily deferred due to unexpected volume"); X.7.28 in a 4yz reply
        (Gmail's "421 4.7.28" and "450 4.7.28 ... has been temporarily rate limited");
        and 4.7.500 to 4.7.699 (Exchange Online's "451 4.7.500 Server busy. Please try
        again later" and its 4.7.5xx/6xx throttling variants). Not Gmail's
        "450 4.2.1 The user you are trying to contact is receiving mail too quickly":
        that limits one mailbox, not the sender.
        """
        if self.kind is not Kind.REPLY or self.reply is None:
            return False
        if self.reply.code == 421:
            return True
        code = self.enhanced
        return (
            code.klass == 4
            and code.subject == 7
            and (code.detail == 28 or 500 <= code.detail <= 699)
        )

    @property
    def connection_level(self) -> bool:
        """Whether the failure is about reaching the server rather than about this mail:
        it counts toward marking the destination dead (Postfix's site failures).

        No connection, a timeout, a dropped connection or a protocol violation at any
        stage, and any refusal of the session itself (greeting, EHLO, HELO). Not a TLS
        failure (the server answered; opportunistic TLS retries in the clear at once),
        and not what the client decided alone. A caller reusing a kept session should
        not count a drop at its first command: servers close idle sessions.
        """
        if self.kind in (Kind.REFUSED, Kind.TIMEOUT, Kind.DROPPED, Kind.PROTOCOL):
            return True
        return self.kind is Kind.REPLY and self.stage in (Stage.GREETING, Stage.EHLO, Stage.HELO)

    @property
    def other_family_may_help(self) -> bool:
        """Whether a 5yz refusal may be about the client's address, so that the same mail
        from the tenant's address of the other family (IPv4 for IPv6) may be accepted.

        At the greeting, EHLO or HELO, a 5yz with no enhanced code or a X.7.x one: the
        server has seen nothing but the client's address and name (RFC 5321 3.1: "554 no
        SMTP service here"; blocklists). At any stage: X.7.25 (RFC 7372: reverse DNS
        validation failed; Postfix's reject_unknown_client_hostname, delayed to RCPT by
        default), X.7.23 (RFC 7372: SPF validation failed: a record may list one family
        only), and a X.7.x reply naming IPv6 (Gmail's "550 5.7.1 ... does not meet IPv6
        sending guidelines regarding PTR records and authentication", sent after the
        final dot). Not a generic 5.7.1 at MAIL or later: it is about the sender or the
        content far more often than about the address.
        """
        if self.kind is not Kind.REPLY or self.reply is None or not self.permanent:
            return False
        code = self.enhanced
        if self.stage in (Stage.GREETING, Stage.EHLO, Stage.HELO):
            return self.reply.enhanced is None or code.subject == 7
        if code.subject != 7:
            return False
        return code.detail in (23, 25) or "ipv6" in self.reply.text.lower()


def _while(stage: Stage) -> str:
    activity = stage.activity
    return activity if activity.startswith("while") else f"while {activity}"


def refused(detail: str) -> Failure:
    """No connection was made; `detail` says why ("connection refused")."""
    return Failure(Kind.REFUSED, Stage.CONNECT, False, _NO_ANSWER, detail=detail)


def timed_out(stage: Stage, seconds: float) -> Failure:
    code = _NO_ANSWER if stage is Stage.CONNECT else _BAD_CONNECTION
    return Failure(Kind.TIMEOUT, stage, False, code, seconds=seconds)


def dropped(stage: Stage, detail: str) -> Failure:
    """The server closed or reset the connection; `detail` says which."""
    return Failure(Kind.DROPPED, stage, False, _BAD_CONNECTION, detail=detail)


def violation(stage: Stage, detail: str) -> Failure:
    return Failure(Kind.PROTOCOL, stage, False, _PROTOCOL, detail=detail)


def tls_failed(stage: Stage, detail: str, reply: Reply | None = None) -> Failure:
    """TLS could not be had; never permanent: the next attempt may find it working."""
    code = _TLS_NOT_OFFERED if stage is not Stage.TLS else _CRYPTO
    return Failure(Kind.TLS, stage, False, code, reply=reply, detail=detail)


def refusal(stage: Stage, reply: Reply) -> Failure:
    """The server refused with a 4yz or 5yz `reply` (RFC 5321 4.2.1: 5yz is permanent)."""
    permanent = reply.code >= 500
    code = reply.enhanced or Enhanced(reply.code // 100, 0, 0)  # RFC 3463 3.1: X.0.0
    return Failure(Kind.REPLY, stage, permanent, code, reply=reply)


def unsendable(stage: Stage, enhanced: Enhanced, detail: str) -> Failure:
    """The client will not send this, for a reason that holds at every attempt."""
    return Failure(Kind.UNSENDABLE, stage, True, enhanced, detail=detail)
