"""The SMTP server core (nsmail.core.smtp.server) against scripted clients: sessions, pipelining,
dot-unstuffing, limits, and hostile input (overlong lines, floods, bare LF, NUL)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsmail.core.smtp.server import (
    MAX_COMMAND,
    MAX_ERRORS,
    MAX_RECIPIENTS,
    NEED_DATA,
    Aborted,
    Closed,
    Content,
    Data,
    EndOfMessage,
    Event,
    Mail,
    Output,
    Recipient,
    Reply,
    Server,
)

HELLO = b"EHLO client.test\r\n"
ENVELOPE = b"MAIL FROM:<a@bcd.test>\r\nRCPT TO:<b@cde.test>\r\n"


@dataclass
class Client:
    """Feeds a server scripted input and answers its decisions: `decide` gives the reply
    for an event (None: the usual positive one)."""

    server: Server
    decide: Callable[[Event], Reply | None] = lambda event: None
    replies: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    closed: bool = False

    def send(self, *chunks: bytes) -> Client:
        for chunk in chunks:
            self.server.receive(chunk)
            self._run()
        return self

    def end(self) -> Client:
        return self.send(b"")

    def _run(self) -> None:
        while (event := self.server.next_event()) is not NEED_DATA and not self.closed:
            if isinstance(event, Output):
                self.replies += event.data.splitlines(keepends=True)
                continue
            self.events.append(event)
            if isinstance(event, Closed):
                self.closed = True
            elif isinstance(event, Mail | Recipient | Data | EndOfMessage):
                self.server.answer(self.decide(event))

    @property
    def codes(self) -> list[str]:
        """The reply lines' codes and enhanced codes (the last line of each reply)."""
        last_lines = [r for r in self.replies if r[3:4] == b" "]
        return [" ".join(r.decode().split()[:2]) for r in last_lines]

    @property
    def content(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, Content))

    def of(self, kind: type) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


def session(size_limit: int = 0, **kwargs: Callable[[Event], Reply | None]) -> Client:
    return Client(Server("bcd.test", size_limit=size_limit), **kwargs)


def test_a_whole_session() -> None:
    client = session(size_limit=1000).send(
        HELLO,
        b"MAIL FROM:<a@bcd.test> SIZE=100 BODY=8BITMIME SMTPUTF8\r\n",
        b"RCPT TO:<b@cde.test>\r\n",
        b"RCPT TO:<postmaster>\r\n",
        b"DATA\r\n",
        b"Subject: hi\r\n\r\n..leading dot\r\n.\r\n",
        b"QUIT\r\n",
    )
    assert client.replies[:6] == [
        b"220 bcd.test ESMTP nsmail\r\n",
        b"250-bcd.test\r\n",
        b"250-PIPELINING\r\n",
        b"250-SIZE 1000\r\n",
        b"250-8BITMIME\r\n",
        b"250-SMTPUTF8\r\n",
    ]
    assert client.codes == [
        "220 bcd.test",
        "250 ENHANCEDSTATUSCODES",
        "250 2.1.0",
        "250 2.1.5",
        "250 2.1.5",
        "354 End",
        "250 2.0.0",
        "221 2.0.0",
    ]
    assert client.of(Mail) == [Mail("a@bcd.test", 100, True)]
    assert client.of(Data) == [Data("a@bcd.test", ("b@cde.test", "postmaster"))]
    assert client.content == b"Subject: hi\r\n\r\n.leading dot\r\n"
    assert client.closed and client.of(EndOfMessage) == [EndOfMessage()]


def test_pipelined_commands_are_answered_in_order() -> None:
    script = HELLO + ENVELOPE + b"RCPT TO:<>\r\nDATA\r\nhi\r\n.\r\nNOOP\r\nQUIT\r\n"
    whole = session().send(script)
    assert whole.codes == [
        "220 bcd.test",
        "250 ENHANCEDSTATUSCODES",
        "250 2.1.0",
        "250 2.1.5",
        "501 5.1.3",
        "354 End",
        "250 2.0.0",
        "250 2.0.0",
        "221 2.0.0",
    ]
    # Any split of the input gives the same replies and the same message.
    bytewise = session().send(*(script[i : i + 1] for i in range(len(script))))
    assert (bytewise.replies, bytewise.content) == (whole.replies, whole.content)


@pytest.mark.parametrize(
    ("data", "content"),
    [
        (b".\r\n", b""),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"...x\r\n.\r\n", b"..x\r\n"),
        (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n"),
        # Bare line ends: content, never an end of data (smuggling), dot-unstuffed as lines.
        (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n"),
        (b"a\n.\r\nb\r\n.\r\n", b"a\n.\r\nb\r\n"),
        (b"a\r\n.\nb\r\n.\r\n", b"a\r\n.\nb\r\n"),
        (b"a\r.\rb\r\n.\r\n", b"a\r.\rb\r\n"),
        (b"a\n..b\r\n.\r\n", b"a\n.b\r\n"),
        (b"nul\0byte\r\n.\r\n", b"nul\0byte\r\n"),
        (b"x" * 5000 + b"\r\n.\r\n", b"x" * 5000 + b"\r\n"),  # over 1000 octets: taken
    ],
)
def test_message_content(data: bytes, content: bytes) -> None:
    client = session().send(HELLO + ENVELOPE + b"DATA\r\n", data)
    assert client.content == content and client.of(EndOfMessage) == [EndOfMessage()]
    split = session().send(
        HELLO + ENVELOPE + b"DATA\r\n", *(data[i : i + 1] for i in range(len(data)))
    )
    assert split.content == content and split.of(EndOfMessage) == [EndOfMessage()]


def test_several_transactions_and_reset() -> None:
    client = session().send(
        HELLO,
        ENVELOPE + b"DATA\r\none\r\n.\r\n",
        b"MAIL FROM:<>\r\nRCPT TO:<c@cde.test>\r\nRSET\r\n",
        b"MAIL FROM:<d@bcd.test>\r\nRCPT TO:<e@cde.test>\r\nDATA\r\ntwo\r\n.\r\n",
    )
    assert client.of(Data) == [
        Data("a@bcd.test", ("b@cde.test",)),
        Data("d@bcd.test", ("e@cde.test",)),
    ]
    assert client.content == b"one\r\ntwo\r\n"
    assert client.of(Mail)[1] == Mail("", None, False)  # the null reverse-path


def test_a_later_ehlo_resets_the_transaction() -> None:
    client = session().send(HELLO, ENVELOPE, HELLO, b"DATA\r\n")
    assert client.codes[-1] == "503 5.5.1" and client.of(Data) == []


@pytest.mark.parametrize(
    ("script", "reply"),
    [
        (b"MAIL FROM:<a@bcd.test>\r\n", "503 5.5.1"),  # before EHLO
        (HELLO + b"RCPT TO:<b@cde.test>\r\n", "503 5.5.1"),
        (HELLO + b"DATA\r\n", "503 5.5.1"),
        (HELLO + b"MAIL FROM:<a@bcd.test>\r\nDATA\r\n", "503 5.5.1"),
        (HELLO + ENVELOPE + b"MAIL FROM:<a@bcd.test>\r\n", "503 5.5.1"),  # nested
        (b"EHLO\r\n", "501 5.5.4"),
        (b"HELO\r\n", "501 5.5.4"),
        (HELLO + b"MAIL FROM:a@bcd.test\r\n", "501 5.5.4"),
        (HELLO + b"MAIL TO:<a@bcd.test>\r\n", "501 5.5.4"),
        (HELLO + b"MAIL FROM:<a@bcd.test\r\n", "501 5.5.4"),
        (HELLO + b"MAIL FROM:<a@bcd.test>x\r\n", "501 5.5.4"),
        (HELLO + b"MAIL FROM:<a@bcd.test> SIZE=big\r\n", "501 5.5.4"),
        (HELLO + b"MAIL FROM:<a@bcd.test> BODY=BINARYMIME\r\n", "501 5.5.4"),
        (HELLO + b"MAIL FROM:<a@bcd.test> RET=HDRS\r\n", "555 5.5.4"),
        (HELLO + b"MAIL FROM:<a@bcd.test>\r\nRCPT TO:<b@cde.test> NOTIFY=NEVER\r\n", "555 5.5.4"),
        (HELLO + b"MAIL FROM:<a@bcd.test>\r\nRCPT TO:<>\r\n", "501 5.1.3"),
        (HELLO + b"MAIL FROM:<jos\xc3\xa9@bcd.test>\r\n", "553 5.6.7"),  # no SMTPUTF8
        (HELLO + ENVELOPE + b"DATA now\r\n", "501 5.5.4"),
        (b"VRFY bob\r\n", "252 2.5.0"),
        (b"VRFY\r\n", "501 5.5.4"),
        (b"NOOP whatever\r\n", "250 2.0.0"),
        (b"RSET\r\n", "250 2.0.0"),
        (b"EXPN list\r\n", "502 5.5.1"),
        (b"STARTTLS\r\n", "502 5.5.1"),
        (b"BOGUS\r\n", "500 5.5.2"),
        (b".\r\n", "500 5.5.2"),
        (b"NOOP \xff\r\n", "500 5.5.2"),  # not UTF-8
        (b"NOOP a\0b\r\n", "500 5.5.2"),
        (b"NOOP a\rb\r\n", "500 5.5.2"),
    ],
)
def test_refusals(script: bytes, reply: str) -> None:
    assert session().send(script).codes[-1] == reply


def test_paths_and_parameters() -> None:
    client = session().send(
        HELLO,
        b"mail from: <@relay.test,@other.test:a@bcd.test> smtputf8 size=7\r\n",
        "RCPT TO:<jos\u00e9@cde.test>\r\n".encode(),
        b'RCPT TO:<"quoted >"@cde.test>\r\n',
        b"NOOP\n",  # a bare LF ends a command line too
    )
    assert client.of(Mail) == [Mail("a@bcd.test", 7, True)]
    assert client.of(Recipient) == [
        Recipient("jos\u00e9@cde.test"),
        Recipient('"quoted >"@cde.test'),
    ]
    assert client.codes[-1] == "250 2.0.0"


def test_the_size_limit() -> None:
    declared = session(size_limit=100).send(HELLO, b"MAIL FROM:<a@bcd.test> SIZE=101\r\n")
    assert declared.codes[-1] == "552 5.3.4" and declared.of(Mail) == []
    # Over the limit while it streams: dropped at once, refused at the end, and the
    # session goes on.
    client = session(size_limit=100).send(
        HELLO + ENVELOPE + b"DATA\r\n", b"x" * 60 + b"\r\n", b"y" * 60 + b"\r\n", b".\r\n"
    )
    assert client.of(Aborted) == [Aborted("over the size limit")]
    assert client.of(EndOfMessage) == [] and client.codes[-1] == "552 5.3.4"
    assert len(client.content) <= 100
    client.send(ENVELOPE + b"DATA\r\nsmall\r\n.\r\n")
    assert client.of(EndOfMessage) == [EndOfMessage()] and client.codes[-1] == "250 2.0.0"
    exact = session(size_limit=10).send(HELLO + ENVELOPE + b"DATA\r\n12345678\r\n.\r\n")
    assert exact.content == b"12345678\r\n" and exact.codes[-1] == "250 2.0.0"


def test_answers_decide_and_keep_the_state() -> None:
    def refuse_foreign(event: Event) -> Reply | None:
        if isinstance(event, Mail) and not event.sender.endswith("@bcd.test"):
            return Reply(553, "5.7.1 not yours")
        if isinstance(event, Recipient) and event.address.startswith("no"):
            return Reply(550, "5.1.1 no")
        if isinstance(event, EndOfMessage):
            return Reply(452, "4.3.1 disk full")
        return None

    client = session(decide=refuse_foreign).send(
        HELLO,
        b"MAIL FROM:<x@evil.test>\r\nRCPT TO:<b@cde.test>\r\n",  # refused: no transaction
        b"MAIL FROM:<a@bcd.test>\r\nRCPT TO:<nobody@cde.test>\r\nDATA\r\n",  # no recipient
        b"RCPT TO:<b@cde.test>\r\nDATA\r\nhi\r\n.\r\n",
        ENVELOPE,  # the transaction ended with the refused message
    )
    assert client.codes[2:] == [
        "553 5.7.1",
        "503 5.5.1",
        "250 2.1.0",
        "550 5.1.1",
        "503 5.5.1",
        "250 2.1.5",
        "354 End",
        "452 4.3.1",
        "250 2.1.0",
        "250 2.1.5",
    ]
    assert client.of(Data) == [Data("a@bcd.test", ("b@cde.test",))]


def test_the_end_of_input() -> None:
    # Inside a message: dropped, not to be queued.
    client = session().send(HELLO + ENVELOPE + b"DATA\r\nhalf a mess").end()
    assert client.of(Aborted) == [Aborted("the input ended before the message")]
    assert client.of(EndOfMessage) == [] and client.closed
    dot = session().send(HELLO + ENVELOPE + b"DATA\r\nx\r\n.").end()  # no CRLF after it
    assert dot.of(EndOfMessage) == [] and dot.of(Aborted) and dot.closed
    # Inside a transaction or a command line: the session simply ends.
    client = session().send(HELLO + ENVELOPE + b"NO").end()
    assert client.of(Data) == [] and client.closed and client.codes[-1] == "250 2.1.5"
    # After QUIT, nothing more is read.
    client = session().send(b"QUIT\r\nNOOP\r\n")
    assert client.closed and client.codes == ["220 bcd.test", "221 2.0.0"]


def test_answering_out_of_turn_is_a_bug() -> None:
    server = Server("bcd.test")
    with pytest.raises(RuntimeError):
        server.answer()
    server.receive(HELLO + b"MAIL FROM:<a@bcd.test>\r\n")
    while not isinstance(server.next_event(), Mail):
        pass
    with pytest.raises(RuntimeError):
        server.next_event()


# --- hostile clients ---------------------------------------------------------------------


def test_an_overlong_command_line_is_refused_and_never_held() -> None:
    server = Server("bcd.test")
    client = Client(server).send(HELLO)
    for _ in range(100):  # 6.4 MB without a line end
        client.send(b"x" * 65536)
        assert len(server._input) <= MAX_COMMAND + 65536  # what it holds, bounded
    client.send(b"\r\nNOOP\r\n")
    assert client.codes[-2:] == ["500 5.5.2", "250 2.0.0"]
    assert b"line too long" in client.replies[-2]
    # The limit itself: MAIL with every parameter and a 254-octet address fits.
    longest = (
        b"MAIL FROM:<" + b"a" * 245 + b"@bcd.test> SIZE=99999999999999999999 BODY=8BITMIME SMTPUTF8"
    )
    client.send(longest[: MAX_COMMAND - 2] + b"\r\n")
    assert client.codes[-1] == "501 5.5.4"  # a SIZE of 20 digits is refused, not the line
    client.send(b"NOOP " + b"x" * (MAX_COMMAND - 6) + b"\r\n")
    assert client.codes[-1] == "500 5.5.2"


def test_a_flood_of_errors_ends_the_session() -> None:
    client = session().send(b"GARBAGE\r\n" * (MAX_ERRORS + 5) + b"NOOP\r\n")
    assert client.codes[1:] == ["500 5.5.2"] * (MAX_ERRORS - 1) + ["421 4.7.0"]
    assert client.closed


def test_a_flood_of_commands_is_answered_one_by_one() -> None:
    client = session().send(b"NOOP\r\n" * 10_000 + b"QUIT\r\n")
    assert client.codes[1:] == ["250 2.0.0"] * 10_000 + ["221 2.0.0"]


def test_recipients_per_message_are_limited() -> None:
    rcpts = b"".join(b"RCPT TO:<r%d@cde.test>\r\n" % i for i in range(MAX_RECIPIENTS + 1))
    client = session().send(HELLO + b"MAIL FROM:<a@bcd.test>\r\n" + rcpts + b"DATA\r\n")
    assert client.codes.count("250 2.1.5") == MAX_RECIPIENTS
    assert "452 4.5.3" in client.codes
    (data,) = client.of(Data)
    assert isinstance(data, Data) and len(data.recipients) == MAX_RECIPIENTS


def test_reply_texts_are_made_safe() -> None:
    # A line end in a text is one more line of the same reply, never a line of its own.
    encoded = Reply(550, "5.7.1 evil\r\n221 Injected \u00e9\0 " + "x" * 1000).encode()
    assert encoded.isascii()
    assert encoded.startswith(b"550-5.7.1 evil?\r\n550 221 Injected ?? xxx")
    assert all(line.startswith(b"550") and len(line) <= 510 for line in encoded.splitlines())
    assert Reply(250, "a\nb").encode() == b"250-a\r\n250 b\r\n"


pieces = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            HELLO,
            b"HELO x\r\n",
            ENVELOPE,
            b"MAIL FROM:<> SIZE=5\r\n",
            b"RCPT TO:<x>\r\n",
            b"DATA\r\n",
            b"\r\n.\r\n",
            b".\r\n",
            b"..",
            b"\n.\n",
            b"\r",
            b"\n",
            b"\0",
            b"RSET\r\n",
            b"QUIT\r\n",
            b"x" * 700,
            "\u00e9".encode(),
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(pieces, max_size=40), st.booleans())
def test_any_input_gives_well_formed_replies(chunks: list[bytes], refuse: bool) -> None:
    def decide(event: Event) -> Reply | None:
        return Reply(550, "5.0.0 no") if refuse and isinstance(event, Recipient) else None

    client = session(size_limit=500, decide=decide).send(*chunks).end()
    assert client.closed
    assert all(
        line.endswith(b"\r\n") and len(line) <= 512 and line[:3].isdigit()
        for line in client.replies
    )
    # Every message ends, completed or dropped, and none passes on more than the limit.
    assert len(client.of(EndOfMessage) + client.of(Aborted)) == len(client.of(Data))
    size = 0
    for event in client.events:
        size = 0 if isinstance(event, Data) else size + len(getattr(event, "data", b""))
        assert size <= 500
