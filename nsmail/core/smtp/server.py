"""The server side of SMTP (RFC 5321), sans IO: bytes in, replies and events out.

`Server` parses what a client sends and keeps the session's state. It decides what the
protocol decides (syntax, command order, line, size and recipient limits, the extensions
it offers) and hands what policy decides to its caller as events to answer: a sender, a
recipient, the start and the end of a message, a STARTTLS, the credentials of an AUTH.
The caller does every read and write: `nsmail-sendmail -bs` over stdin and stdout, the
tenant's worker over a connection its supervisor handed it (`nsmail.tenant.smtpd`), and
the submission front on ports 587 and 465 (`nsmail.host.submission`). What a session
offers and demands beyond RFC 5321 is its `Policy`.

Use: `receive` the bytes read (b"" at the end of input), then take `next_event()` until
it returns NEED_DATA. `Output` is bytes to send; sending them before waiting for input
is all that pipelining (RFC 2920) asks. `Mail`, `Recipient`, `Data` and `EndOfMessage`
wait for `answer` (None: the usual positive reply) before anything else happens.
`Content` pieces make up the message, dot-unstuffed; `Aborted` says to drop what was
stored of it; `Closed` ends the session. `StartTls` and `Authenticate` wait for `answer`
too: after a positive answer to StartTls the caller sends the reply, does the handshake
and calls `tls_started` (RFC 3207 4.2: the session starts afresh, and whatever the client
sent in clear after STARTTLS is thrown away, so nothing can be injected into the
encrypted session); a positive answer to Authenticate authenticates the session.

Choices where the RFCs leave room:
- A command line may end with a bare LF (a client written for Unix); nothing is
  smuggled in a command.
- DATA ends only at CRLF "." CRLF (RFC 5321 4.1.1.4). A bare LF or CR in the content is
  taken as sent by `sendmail -bs` (`Policy.bare_newlines`), like Postfix's
  `smtpd_forbid_bare_newline = normalize`: it cannot end a message early here, and the
  worker rewrites every line end (CRLF, CR or LF) to CRLF and dot-stuffs on the way
  out, so no receiver downstream ever sees one that it could read as an end of data
  (the "SMTP smuggling" of two servers that disagree). Over the network (the
  listeners) a message with one is refused whole once its end has come, 550 5.5.2, as
  Postfix's `smtpd_forbid_bare_newline = yes` refuses it (RFC 5321 2.3.8: lines end in
  CRLF); the session goes on. A line after a bare LF is a line, for dot-unstuffing.
- Text lines longer than 1000 octets (4.5.3.1.6) are taken, streamed, as Postfix does;
  the worker breaks them at 998. Command lines are held to 512 octets (4.5.3.1.4) plus
  the room MAIL's parameters add, and refused beyond with 500 5.5.2.
- At most 1000 recipients per message (4.5.3.1.8 asks for at least 100), then 452
  4.5.3; 20 protocol errors end the session with 421, as Postfix's
  smtpd_hard_error_limit does.
- VRFY says 252, never whether a mailbox exists (3.5.3).
- AUTH (RFC 4954) is offered only once TLS is on, never in clear (RFC 8314 3), with
  PLAIN and LOGIN; a session with `Policy.auth` takes no MAIL before it (530 5.7.0).
  AUTH is not taken in a transaction or twice (503), a response of "*" cancels it
  (501), and one that does not decode is 501 5.5.2.

Security: every byte is the client's. Nothing the client sends is held beyond one
command line (a longer one is dropped as it comes), the recipients of one transaction
(bounded above) and what one `receive` brought; message content is passed on in pieces.
Reply texts are made printable ASCII of at most 512 octets a line, whatever the caller
or the client put in them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from nsmail.core.smtp.auth import (
    MECHANISMS,
    PASSWORD_PROMPT,
    USERNAME_PROMPT,
    AuthError,
    Credentials,
    decode_plain,
    decode_text,
)
from nsmail.core.text import wire_text

# RFC 5321 4.5.3.1.4: 512 octets with CRLF, and the room MAIL's parameters add (RFC 1870
# 3: 26 for SIZE; RFC 6531 3.4: 10 for SMTPUTF8; " BODY=8BITMIME": 14).
MAX_COMMAND = 512 + 26 + 10 + 14
MAX_REPLY_LINE = 512  # RFC 5321 4.5.3.1.5, with CRLF
MAX_RECIPIENTS = 1000
MAX_ERRORS = 20


@dataclass(frozen=True, slots=True)
class Policy:
    """What a session offers and demands beyond RFC 5321's core."""

    greet: bool = True  # False: a front greeted and authenticated the client already
    starttls: bool = False  # offer STARTTLS (RFC 3207) while the session is in clear
    tls: bool = False  # the session is encrypted from the start (RFC 8314 implicit TLS)
    auth: bool = False  # offer AUTH once encrypted, and take no MAIL before it
    bare_newlines: bool = True  # take a bare LF or CR in DATA; False: refuse the message


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: a code and its text, one line per "\\n" (RFC 5321 4.2.1)."""

    code: int
    text: str

    def encode(self) -> bytes:
        lines = self.text.split("\n")
        last = len(lines) - 1
        return b"".join(
            f"{self.code}{' ' if i == last else '-'}{wire_text(line)}".encode("ascii")[
                : MAX_REPLY_LINE - 2
            ]
            + b"\r\n"
            for i, line in enumerate(lines)
        )

    @property
    def positive(self) -> bool:
        return self.code < 400


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Output:
    """Bytes to send to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Mail:
    """MAIL FROM: to be answered. `sender` is the path without its brackets ("" for the
    null reverse-path) and without a source route."""

    sender: str
    size: int | None  # RFC 1870 SIZE=, the client's estimate
    smtputf8: bool  # RFC 6531


@dataclass(frozen=True, slots=True)
class Recipient:
    """RCPT TO: to be answered."""

    address: str


@dataclass(frozen=True, slots=True)
class Data:
    """DATA, with the transaction's accepted sender and recipients: to be answered."""

    sender: str
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Content:
    """A piece of the message, dot-unstuffed (RFC 5321 4.5.2), line ends as sent."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS: to be answered (None: 220, and then the handshake)."""


@dataclass(frozen=True, slots=True)
class Authenticate:
    """AUTH with the credentials the client gave: to be answered, 235 or 535."""

    mechanism: str  # one of auth.MECHANISMS
    credentials: Credentials


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The message is complete: to be answered, positively only once it is stored."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """Drop what was stored of the message in progress; it will not be queued."""

    reason: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The session is over."""


@dataclass(frozen=True, slots=True)
class NeedData:
    """Nothing more to do until `receive` is given more input."""


NEED_DATA = NeedData()
Event = (
    Output
    | Mail
    | Recipient
    | Data
    | Content
    | EndOfMessage
    | StartTls
    | Authenticate
    | Aborted
    | Closed
    | NeedData
)
Decision = Mail | Recipient | Data | EndOfMessage | StartTls | Authenticate


class State(Enum):
    GREETED = "greeted"  # waiting for EHLO or HELO
    READY = "ready"  # no transaction
    MAIL = "mail"  # a sender, no recipient yet
    RCPT = "rcpt"  # a sender and recipients
    DATA = "data"  # reading the message
    CLOSED = "closed"


_SESSION = (State.GREETED, State.READY, State.MAIL, State.RCPT)

# The state table: the states each command is valid in, and the state it leads to once
# it succeeds (None: the state stays). Anything else is out of sequence (503). MAIL,
# RCPT and DATA succeed only when the caller's answer is positive; the end of the
# message (".") leads back to READY whatever the answer.
_TABLE: dict[str, tuple[tuple[State, ...], State | None]] = {
    # RFC 5321 4.1.4: a later EHLO or HELO resets the session as RSET does.
    "EHLO": (_SESSION, State.READY),
    "HELO": (_SESSION, State.READY),
    "MAIL": ((State.READY,), State.MAIL),
    "RCPT": ((State.MAIL, State.RCPT), State.RCPT),
    "DATA": ((State.RCPT,), State.DATA),
    ".": ((State.DATA,), State.READY),
    "RSET": (_SESSION, None),  # READY once greeted: see _rset
    "NOOP": (_SESSION, None),
    "VRFY": (_SESSION, None),
    "QUIT": (_SESSION, State.CLOSED),
    # RFC 3207 4.2 and RFC 4954 4: both start the session afresh, or authenticate it.
    "STARTTLS": ((State.READY,), State.GREETED),
    "AUTH": ((State.READY,), None),
}
_NOT_IMPLEMENTED = frozenset({"EXPN", "HELP", "TURN", "ETRN", "BDAT"})
_OUT_OF_SEQUENCE = {
    State.GREETED: "5.5.1 send HELO or EHLO first",
    State.READY: "5.5.1 need MAIL command",
    State.MAIL: "5.5.1 need RCPT command",
}

# Where content is: at the start of a line after CRLF (or of the data), after a bare LF,
# or inside a line.
_AFTER_CRLF, _AFTER_LF, _INSIDE = "crlf", "lf", "inside"


class Server:
    """One SMTP session's protocol state (see the module docstring for its use)."""

    def __init__(self, hostname: str, *, size_limit: int = 0, policy: Policy = Policy()) -> None:
        self.hostname = hostname
        self.size_limit = size_limit  # 0: none
        self.policy = policy
        self.tls = policy.tls
        # A session a front greeted has been authenticated there, and goes on from EHLO.
        self.authenticated = not policy.greet
        self.state = State.GREETED if policy.greet else State.READY
        self._input = bytearray()
        self._eof = False
        greeting = [Reply(220, f"{hostname} ESMTP nsmail").encode()] if policy.greet else []
        self._outbox: list[bytes] = greeting
        self._pending: Decision | None = None
        self._challenge: tuple[str, str] | None = None  # AUTH: (mechanism, user so far)
        self._awaiting_tls = False  # STARTTLS was answered: no input counts until TLS is on
        self._errors = 0
        self._overlong = False  # dropping a command line too long to hold
        # The transaction.
        self._sender = ""
        self._smtputf8 = False
        self._recipients: list[str] = []
        # The message being read.
        self._position = _AFTER_CRLF
        self._size = 0
        self._too_large = False
        self._bare_newline = False

    def receive(self, data: bytes) -> None:
        """Input from the client; b"" at its end."""
        if not data:
            self._eof = True
        elif self.state != State.CLOSED:
            self._input += data

    def next_event(self) -> Event:
        if self._outbox:
            return Output(self._outbox.pop(0))
        if self._pending is not None:
            raise RuntimeError(f"{type(self._pending).__name__} is waiting for an answer")
        if self.state == State.CLOSED:
            return Closed()
        if self._awaiting_tls:
            return NEED_DATA
        if self.state == State.DATA:
            return self._content()
        command = self._next_command()
        if command is not None:
            return command
        if not self._eof:
            return NEED_DATA
        self.state = State.CLOSED
        return Closed()

    def answer(self, reply: Reply | None = None) -> None:
        """Decide the pending Mail, Recipient, Data or EndOfMessage; None: accept it."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("no event is waiting for an answer")
        reply = reply or _ACCEPTED[type(pending)]
        self._outbox.append(reply.encode())
        if isinstance(pending, EndOfMessage):
            self._end_transaction(_TABLE["."][1])
        elif reply.positive:
            self._succeed(pending)

    def tls_started(self) -> None:
        """The TLS handshake the answer to StartTls asked for is done (RFC 3207 4.2)."""
        self.tls = True
        self._awaiting_tls = False
        self._input.clear()  # sent in clear after STARTTLS: not the client's, maybe
        self._overlong = False

    def unread(self) -> bytes:
        """Input received but not yet parsed, taken out: what a client pipelined after
        the command that ends this server's part (a front's AUTH)."""
        data = bytes(self._input)
        self._input.clear()
        return data

    def _offers(self) -> tuple[str, ...]:
        offers = []
        if self.policy.starttls and not self.tls:
            offers.append("STARTTLS")
        if self.policy.auth and self.tls and not self.authenticated:
            offers.append(f"AUTH {' '.join(MECHANISMS)}")
        return tuple(offers)

    # -- commands -------------------------------------------------------------------------

    def _next_command(self) -> Event | None:
        """The outcome of the next command line, or None until one is complete."""
        end = self._input.find(b"\n")
        if end < 0:
            if len(self._input) > MAX_COMMAND:  # dropped as it comes, never held
                self._overlong = True
                self._input.clear()
            return None
        line = bytes(self._input[:end])
        del self._input[: end + 1]
        if self._overlong or len(line) + 1 > MAX_COMMAND:
            self._overlong = False
            self._challenge = None
            return self._error(500, "5.5.2 line too long")
        try:
            text = line.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            self._challenge = None
            return self._error(500, "5.5.2 command is not UTF-8")
        if any((c < " " and c != "\t") or c == "\x7f" for c in text):
            self._challenge = None
            return self._error(500, "5.5.2 control character in command")
        if self._challenge is not None:
            return self._response(text.strip(" \t"))
        verb, _, argument = text.strip(" \t").partition(" ")
        verb = verb.upper()
        if verb in _NOT_IMPLEMENTED or (verb in ("STARTTLS", "AUTH") and not self._offered(verb)):
            return self._error(502, "5.5.1 command not implemented")
        if verb not in _TABLE or verb == ".":
            return self._error(500, "5.5.2 command not recognized")
        valid, _ = _TABLE[verb]
        if self.state not in valid:
            if verb == "MAIL" and self.state in (State.MAIL, State.RCPT):
                return self._error(503, "5.5.1 nested MAIL command")
            return self._error(503, _OUT_OF_SEQUENCE[self.state])
        handler = getattr(self, f"_{verb.lower()}")
        event: Event = handler(argument.strip(" \t"))
        return event

    def _offered(self, verb: str) -> bool:
        """Whether the session has STARTTLS or AUTH at all (else they are unknown here); a
        session authenticated by a front refuses AUTH as the front's would (503)."""
        if verb == "STARTTLS":
            return self.policy.starttls
        return self.policy.auth or self.authenticated

    def _ehlo(self, argument: str) -> Event:
        if not argument:
            return self._error(501, "5.5.4 EHLO needs a domain")
        self._end_transaction(State.READY)
        size = f"SIZE {self.size_limit}" if self.size_limit else "SIZE"
        # RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8, RFC 2034 enhanced codes.
        lines = (self.hostname, "PIPELINING", size, "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")
        return Output(Reply(250, "\n".join((*lines, *self._offers()))).encode())

    def _starttls(self, argument: str) -> Event:
        if argument:
            return self._error(501, "5.5.4 STARTTLS takes no argument")
        if self.tls:
            return self._error(503, "5.5.1 TLS is on already")
        return self._decide(StartTls())

    def _auth(self, argument: str) -> Event:
        if self.authenticated:
            return self._error(503, "5.5.1 already authenticated")  # RFC 4954 4
        if not self.tls:
            return self._refuse(538, "5.7.11 encryption required: STARTTLS first")  # RFC 4954 6
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in MECHANISMS:
            return self._error(504, "5.5.4 unrecognized authentication type")
        initial = initial.strip(" ")
        if mechanism == "PLAIN":
            if not initial:  # RFC 4954 4: an empty challenge, then the response
                self._challenge = ("PLAIN", "")
                return Output(b"334 \r\n")
            return self._credentials("PLAIN", initial)
        if initial:  # LOGIN's user name, sent with the command
            return self._response_login(initial)
        self._challenge = ("LOGIN", "")
        return Output(f"334 {USERNAME_PROMPT}\r\n".encode())

    def _response(self, text: str) -> Event:
        """A line answering AUTH's challenge: a response, never a command."""
        mechanism, user = self._challenge or ("", "")
        self._challenge = None
        if text == "*":
            return self._error(501, "5.0.0 authentication canceled")  # RFC 4954 4
        if mechanism == "PLAIN":
            return self._credentials("PLAIN", text)
        if not user:
            return self._response_login(text)
        try:
            password = decode_text(text, secret=True)
        except AuthError as e:
            return self._error(501, f"5.5.2 {e}")
        return self._decide(Authenticate("LOGIN", Credentials(user, password)))

    def _response_login(self, text: str) -> Event:
        try:
            user = decode_text(text)
        except AuthError as e:
            return self._error(501, f"5.5.2 {e}")
        self._challenge = ("LOGIN", user)
        return Output(f"334 {PASSWORD_PROMPT}\r\n".encode())

    def _credentials(self, mechanism: str, response: str) -> Event:
        try:
            credentials = decode_plain(response)
        except AuthError as e:
            return self._error(501, f"5.5.2 {e}")
        return self._decide(Authenticate(mechanism, credentials))

    def _helo(self, argument: str) -> Event:
        if not argument:
            return self._error(501, "5.5.4 HELO needs a domain")
        self._end_transaction(State.READY)
        return Output(Reply(250, self.hostname).encode())

    def _mail(self, argument: str) -> Event:
        if self.policy.auth and not self.authenticated:
            return self._refuse(530, "5.7.0 authentication required")  # RFC 4954 6
        parsed = _path(argument, "FROM:")
        if parsed is None:
            return self._error(501, "5.5.4 syntax: MAIL FROM:<address> [parameters]")
        sender, parameters = parsed
        size: int | None = None
        smtputf8 = False
        for keyword, value in parameters:
            if keyword == "SIZE" and value is not None and value.isdigit() and len(value) < 20:
                size = int(value)
            elif keyword == "BODY" and value is not None and value.upper() in ("7BIT", "8BITMIME"):
                pass  # RFC 6152: any octets are taken in either case
            elif keyword == "SMTPUTF8" and value is None:
                smtputf8 = True
            elif keyword in ("SIZE", "BODY", "SMTPUTF8"):
                return self._error(501, f"5.5.4 bad {keyword} parameter")
            else:
                return self._error(555, f"5.5.4 unsupported parameter {keyword}")
        if self.size_limit and size is not None and size > self.size_limit:
            # RFC 1870 6.1: refused up front when the estimate is over the limit.
            return self._refuse(552, "5.3.4 message size exceeds fixed maximum message size")
        if not sender.isascii() and not smtputf8:
            return self._refuse(553, "5.6.7 a non-ASCII address needs SMTPUTF8")  # RFC 6531
        return self._decide(Mail(sender, size, smtputf8))

    def _rcpt(self, argument: str) -> Event:
        parsed = _path(argument, "TO:")
        if parsed is None:
            return self._error(501, "5.5.4 syntax: RCPT TO:<address>")
        recipient, parameters = parsed
        if parameters:
            return self._error(555, f"5.5.4 unsupported parameter {parameters[0][0]}")
        if not recipient:
            return self._error(501, "5.1.3 a recipient cannot be the null address")
        if not recipient.isascii() and not self._smtputf8:
            return self._refuse(553, "5.6.7 a non-ASCII address needs SMTPUTF8")
        if len(self._recipients) >= MAX_RECIPIENTS:
            return self._refuse(452, "4.5.3 too many recipients")  # RFC 5321 4.5.3.1.10
        return self._decide(Recipient(recipient))

    def _data(self, argument: str) -> Event:
        if argument:
            return self._error(501, "5.5.4 DATA takes no argument")
        return self._decide(Data(self._sender, tuple(self._recipients)))

    def _rset(self, argument: str) -> Event:
        if self.state != State.GREETED:
            self._end_transaction(State.READY)
        return Output(Reply(250, "2.0.0 Ok").encode())

    def _noop(self, argument: str) -> Event:
        return Output(Reply(250, "2.0.0 Ok").encode())

    def _vrfy(self, argument: str) -> Event:
        if not argument:
            return self._error(501, "5.5.4 VRFY needs an address")
        return Output(Reply(252, "2.5.0 cannot VRFY, but will take the message").encode())

    def _quit(self, argument: str) -> Event:
        self.state = State.CLOSED
        return Output(Reply(221, f"2.0.0 {self.hostname} closing the session").encode())

    def _decide(self, event: Decision) -> Event:
        self._pending = event
        return event

    def _succeed(self, decided: Decision) -> None:
        if isinstance(decided, Mail):
            self._sender, self._smtputf8 = decided.sender, decided.smtputf8
        elif isinstance(decided, Recipient):
            self._recipients.append(decided.address)
        elif isinstance(decided, Authenticate):
            self.authenticated = True
        elif isinstance(decided, StartTls):
            self._end_transaction(None)
            self._awaiting_tls = True
        else:
            self._position, self._size, self._too_large = _AFTER_CRLF, 0, False
            self._bare_newline = False
        self.state = _TABLE[_VERBS[type(decided)]][1] or self.state

    def _end_transaction(self, state: State | None) -> None:
        self._sender, self._smtputf8, self._recipients = "", False, []
        self.state = state or self.state

    def _refuse(self, code: int, text: str) -> Event:
        """A policy refusal the protocol itself makes: not the client's error."""
        return Output(Reply(code, text).encode())

    def _error(self, code: int, text: str) -> Event:
        self._errors += 1
        if self._errors < MAX_ERRORS:
            return Output(Reply(code, text).encode())
        self.state = State.CLOSED
        return Output(Reply(421, f"4.7.0 {self.hostname} too many errors").encode())

    # -- the message ----------------------------------------------------------------------

    def _content(self) -> Event:
        """The next piece of the message, its end, or NEED_DATA (RFC 5321 4.5.2)."""
        data = self._input
        while True:
            if not data:
                return self._cut_off() if self._eof else NEED_DATA
            if self._position != _INSIDE and data[:1] == b".":
                if len(data) < 3 and b".\r\n".startswith(data):
                    if self._eof:
                        return self._cut_off()
                    return NEED_DATA  # the end, a lone dot or a stuffed one: not known yet
                if self._position == _AFTER_CRLF and data.startswith(b".\r\n"):
                    del data[:3]
                    return self._end_of_data()
                if not (data[1:3] == b"\r\n" or data[1:2] == b"\n"):
                    del data[:1]  # a line with more than the dot: the dot was added
            self._position = _INSIDE
            # Only a line end followed by a dot needs a look; all before it is content.
            found = data.find(b"\n.")
            if found >= 0:
                cut = found + 1
                self._position = _AFTER_CRLF if data[found - 1 : found] == b"\r" else _AFTER_LF
            else:
                # A line end at the very end may be followed by a dot: keep it for later.
                cut = len(data) - _line_end_length(data)
            if cut == 0:  # only a line end so far
                return self._cut_off() if self._eof else NEED_DATA
            piece = bytes(data[:cut])
            del data[:cut]
            self._size += len(piece)
            if self._too_large or self._bare_newline:
                continue
            if self.size_limit and self._size > self.size_limit:
                self._too_large = True
                return Aborted("over the size limit")
            if not self.policy.bare_newlines and _has_bare_newline(piece):
                self._bare_newline = True
                return Aborted("a bare LF or CR")
            return Content(piece)

    def _end_of_data(self) -> Event:
        refusal = None
        if self._too_large:
            refusal = Reply(552, "5.3.4 message size exceeds fixed maximum message size")
        elif self._bare_newline:
            refusal = Reply(550, "5.5.2 message refused: a line ends in a bare LF or CR")
        if refusal is not None:
            self._outbox.append(refusal.encode())
            self._end_transaction(_TABLE["."][1])
            return self.next_event()
        return self._decide(EndOfMessage())

    def _cut_off(self) -> Event:
        """The input ended inside the message: it is not to be queued."""
        self.state = State.CLOSED
        dropped = self._too_large or self._bare_newline
        return Closed() if dropped else Aborted("the input ended before the message")


_VERBS: dict[type, str] = {
    Mail: "MAIL",
    Recipient: "RCPT",
    Data: "DATA",
    StartTls: "STARTTLS",
    Authenticate: "AUTH",
}
_ACCEPTED: dict[type, Reply] = {
    Mail: Reply(250, "2.1.0 Ok"),
    Recipient: Reply(250, "2.1.5 Ok"),
    Data: Reply(354, "End data with <CR><LF>.<CR><LF>"),
    EndOfMessage: Reply(250, "2.0.0 Ok"),
    StartTls: Reply(220, "2.0.0 ready to start TLS"),
    Authenticate: Reply(235, "2.7.0 authentication successful"),
}


def _path(argument: str, prefix: str) -> tuple[str, list[tuple[str, str | None]]] | None:
    """`FROM:<path> parameters` split (RFC 5321 4.1.2): the path's address without its
    brackets or source route, and the parameters as (upper-cased keyword, value or None);
    None when it is not that syntax."""
    if argument[: len(prefix)].upper() != prefix:
        return None
    rest = argument[len(prefix) :].lstrip(" ")  # a space after the colon: common, harmless
    if not rest.startswith("<"):
        return None
    end = _closing_bracket(rest)
    if end is None:
        return None
    address, after = rest[1:end], rest[end + 1 :]
    if after and not after.startswith(" "):
        return None
    if address.startswith("@"):  # a source route, "@relay,@relay:": ignored (4.1.2, C)
        _, colon, address = address.partition(":")
        if not colon:
            return None
    parameters = []
    for word in after.split():
        keyword, equals, value = word.partition("=")
        parameters.append((keyword.upper(), value if equals else None))
    return address, parameters


def _closing_bracket(text: str) -> int | None:
    """Where the ">" closing the path that starts `text` is, quoted strings skipped."""
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return None


def _has_bare_newline(piece: bytes) -> bool:
    """Whether a piece of content holds a LF or CR outside a CRLF. A piece never ends in
    a CR that a LF may follow (`_content` keeps a line end at the end for later)."""
    rest = piece.replace(b"\r\n", b"")
    return b"\n" in rest or b"\r" in rest


def _line_end_length(data: bytearray) -> int:
    if data.endswith(b"\r\n"):
        return 2
    return 1 if data.endswith((b"\r", b"\n")) else 0
