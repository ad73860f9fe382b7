"""The sans-IO SMTP client core against scripted replies: what it sends, when, and what
each reply means for each recipient."""

from __future__ import annotations

import pytest

from nsmail.core.smtp import (
    Client,
    Delivered,
    Extensions,
    Failure,
    Kind,
    Stage,
    State,
    TlsMode,
    parse_extensions,
)
from nsmail.core.smtp.client import _NEXT, Event
from nsmail.core.smtp.reply import Enhanced, ReplyReader

GREETING = b"220 mx.rcpt.test ESMTP\r\n"
PIPELINING = b"250-mx.rcpt.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250 8BITMIME\r\n"
PLAIN = b"250-mx.rcpt.test\r\n250 8BITMIME\r\n"
ACCEPT = b"250 2.1.0 ok\r\n"
GO = b"354 go ahead\r\n"
QUEUED = b"250 2.0.0 queued\r\n"


def greeted(ehlo: bytes = PIPELINING, tls: TlsMode = TlsMode.NONE) -> Client:
    client = Client("mail.tenant.test", tls)
    client.receive(GREETING)
    assert client.data_to_send() == b"EHLO mail.tenant.test\r\n"
    client.receive(ehlo)
    return client


def failure(result: Delivered | Failure) -> Failure:
    assert isinstance(result, Failure), result
    return result


def test_a_pipelined_transaction_is_one_write_and_one_outcome_per_recipient() -> None:
    client = greeted()
    assert client.state is State.READY and client.awaiting is None
    client.begin("alice@tenant.test", ["a@rcpt.test", "b@rcpt.test", "a@rcpt.test"], 500, True)
    # RFC 2920 3.1: MAIL, the RCPTs and DATA in one group; each recipient once.
    assert client.data_to_send() == (
        b"MAIL FROM:<alice@tenant.test> SIZE=500 BODY=8BITMIME\r\n"
        b"RCPT TO:<a@rcpt.test>\r\nRCPT TO:<b@rcpt.test>\r\nDATA\r\n"
    )
    assert client.awaiting is Stage.MAIL
    client.receive(ACCEPT + b"250 2.1.5 ok\r\n")
    assert client.awaiting is Stage.RCPT
    client.receive(b"550 5.1.1 no such user\r\n" + GO)
    assert client.state is State.MESSAGE and client.data_to_send() == b""
    client.end_of_message()
    assert client.data_to_send() == b".\r\n" and client.awaiting is Stage.DOT
    client.receive(QUEUED)
    assert client.state is State.READY
    results = client.results()
    assert list(results) == ["a@rcpt.test", "b@rcpt.test"]
    delivered = results["a@rcpt.test"]
    assert isinstance(delivered, Delivered) and delivered.reply.words == "250 2.0.0 queued"
    refused = failure(results["b@rcpt.test"])
    assert (refused.kind, refused.stage, refused.permanent) == (Kind.REPLY, Stage.RCPT, True)
    assert refused.enhanced == Enhanced(5, 1, 1)
    assert client.transactions == 1


def test_without_pipelining_one_command_at_a_time() -> None:
    client = greeted(PLAIN)
    client.begin("alice@tenant.test", ["a@rcpt.test", "b@rcpt.test"], 500, False)
    assert client.data_to_send() == b"MAIL FROM:<alice@tenant.test>\r\n"  # no SIZE offered
    client.receive(ACCEPT)
    assert client.data_to_send() == b"RCPT TO:<a@rcpt.test>\r\n"
    client.receive(b"451 4.3.0 try later\r\n")
    assert client.data_to_send() == b"RCPT TO:<b@rcpt.test>\r\n"
    client.receive(b"251 2.1.5 will forward\r\n")  # RFC 5321 4.2.1: any 2yz takes it
    assert client.data_to_send() == b"DATA\r\n"
    client.receive(GO)
    client.end_of_message()
    client.receive(QUEUED)
    results = client.results()
    assert isinstance(results["b@rcpt.test"], Delivered)
    assert not failure(results["a@rcpt.test"]).permanent


def test_a_refused_mail_sends_nothing_more_and_needs_no_rset() -> None:
    client = greeted(PLAIN)
    client.begin("alice@tenant.test", ["a@rcpt.test"], 500, False)
    client.data_to_send()
    client.receive(b"553 5.1.8 sender domain does not exist\r\n")
    assert client.state is State.READY and client.data_to_send() == b""
    result = failure(client.results()["a@rcpt.test"])
    assert (result.stage, result.permanent) == (Stage.MAIL, True)


def test_all_recipients_refused_ends_with_rset_and_no_data() -> None:
    client = greeted(PLAIN)
    client.begin("alice@tenant.test", ["a@rcpt.test"], 500, False)
    client.data_to_send()
    client.receive(ACCEPT)
    client.data_to_send()
    client.receive(b"550 5.1.1 no\r\n")
    # RFC 5321 4.1.1.5: MAIL was taken, so the transaction is cleared before the next.
    assert client.data_to_send() == b"RSET\r\n" and client.awaiting is Stage.RSET
    assert failure(client.results()["a@rcpt.test"]).stage is Stage.RCPT
    client.receive(b"250 2.0.0 ok\r\n")
    assert client.state is State.READY


def test_a_pipelined_data_accepted_without_recipients_ends_with_a_lone_dot() -> None:
    client = greeted()
    client.begin("alice@tenant.test", ["a@rcpt.test"], 500, False)
    client.data_to_send()
    client.receive(ACCEPT + b"550 5.1.1 no\r\n" + GO)
    assert client.data_to_send() == b".\r\n"  # RFC 2920 3.1
    client.receive(b"554 5.5.1 no valid recipients\r\n")
    assert client.state is State.READY
    assert failure(client.results()["a@rcpt.test"]).stage is Stage.RCPT


def test_a_refused_data_fails_the_accepted_recipients() -> None:
    client = greeted()
    client.begin("alice@tenant.test", ["a@rcpt.test", "b@rcpt.test"], 500, False)
    client.data_to_send()
    client.receive(ACCEPT + b"250 ok\r\n550 5.1.1 no\r\n554 5.7.1 not today\r\n")
    results = client.results()
    assert failure(results["a@rcpt.test"]).stage is Stage.DATA
    assert failure(results["b@rcpt.test"]).stage is Stage.RCPT
    assert client.data_to_send() == b"RSET\r\n"


def test_a_refused_final_dot_ends_the_transaction() -> None:
    client = greeted()
    client.begin("alice@tenant.test", ["a@rcpt.test"], 500, False)
    client.data_to_send()
    client.receive(ACCEPT + ACCEPT + GO)
    client.end_of_message()
    client.data_to_send()
    client.receive(b"452 4.3.1 insufficient storage\r\n")
    # RFC 5321 4.1.1.4: the reply to the dot ends the transaction: no RSET needed.
    assert client.state is State.READY and client.data_to_send() == b""
    result = failure(client.results()["a@rcpt.test"])
    assert (result.stage, result.permanent) == (Stage.DOT, False)


def test_a_positive_reply_to_data_is_never_taken_for_the_dot() -> None:
    client = greeted()
    client.begin("alice@tenant.test", ["a@rcpt.test"], 500, False)
    client.data_to_send()
    client.receive(ACCEPT + ACCEPT + b"250 2.0.0 ok\r\n")
    assert client.closed  # where the server is now is unknown
    result = failure(client.results()["a@rcpt.test"])
    assert (result.kind, result.stage, result.permanent) == (Kind.PROTOCOL, Stage.DATA, False)
    assert "'250 2.0.0 ok' in reply to DATA" in result.words


def test_421_closes_the_session_for_every_recipient_and_asks_to_slow_down() -> None:
    client = greeted()
    client.begin("alice@tenant.test", ["a@rcpt.test", "b@rcpt.test"], 500, False)
    client.data_to_send()
    client.receive(b"421 4.7.28 rate limited\r\n")
    assert client.closed
    results = client.results()
    assert results["a@rcpt.test"] == results["b@rcpt.test"]
    result = failure(results["a@rcpt.test"])
    assert (result.kind, result.stage, result.slow_down) == (Kind.REPLY, Stage.MAIL, True)


def test_mail_parameters_and_smtputf8() -> None:
    client = greeted(b"250-mx\r\n250-PIPELINING\r\n250-SIZE\r\n250 SMTPUTF8\r\n")
    client.begin("jösé@tenant.test", ["ü@rcpt.test"], 123, True)
    # RFC 6531 3.4; no BODY=8BITMIME without 8BITMIME; SIZE without a limit still wants SIZE=.
    assert (
        client.data_to_send()
        == (
            "MAIL FROM:<jösé@tenant.test> SIZE=123 SMTPUTF8\r\nRCPT TO:<ü@rcpt.test>\r\nDATA\r\n"
        ).encode()
    )


def test_what_the_client_will_not_send() -> None:
    client = greeted()  # SIZE 10000, no SMTPUTF8
    client.begin("alice@tenant.test", ["a@rcpt.test"], 10001, False)
    assert client.data_to_send() == b"" and client.state is State.READY
    too_big = failure(client.results()["a@rcpt.test"])
    assert (too_big.kind, too_big.permanent, too_big.enhanced) == (
        Kind.UNSENDABLE,
        True,
        Enhanced(5, 3, 4),
    )
    assert too_big.words == "message size 10001 exceeds the server's limit of 10000"
    client.begin("alice@tenant.test", ["ü@rcpt.test"], 10, False)
    assert failure(client.results()["ü@rcpt.test"]).enhanced == Enhanced(5, 6, 7)
    client.begin("bad sender@tenant.test", ["a@rcpt.test"], 10, False)
    assert failure(client.results()["a@rcpt.test"]).enhanced == Enhanced(5, 1, 7)
    client.begin("alice@tenant.test", ["x>@rcpt.test\r\nRSET", "a@rcpt.test"], 10, False)
    assert client.data_to_send() == (
        b"MAIL FROM:<alice@tenant.test> SIZE=10\r\nRCPT TO:<a@rcpt.test>\r\nDATA\r\n"
    )
    client.receive(ACCEPT + ACCEPT + GO)
    client.end_of_message()
    client.receive(QUEUED)
    results = client.results()
    assert list(results) == ["x>@rcpt.test\r\nRSET", "a@rcpt.test"]
    assert failure(results["x>@rcpt.test\r\nRSET"]).enhanced == Enhanced(5, 1, 3)
    assert client.transactions == 1


def test_ehlo_refused_falls_back_to_helo_and_no_extensions() -> None:
    client = greeted(b"502 5.5.2 what?\r\n")
    assert client.data_to_send() == b"HELO mail.tenant.test\r\n"  # RFC 5321 4.1.4
    client.receive(b"250 mx.rcpt.test\r\n")
    assert client.state is State.READY and client.extensions == Extensions()


def test_a_temporary_ehlo_refusal_fails_the_session() -> None:
    client = greeted(b"450 4.7.1 come back later\r\n")
    assert client.closed and client.failure is not None
    assert (client.failure.stage, client.failure.kind) == (Stage.EHLO, Kind.REPLY)


@pytest.mark.parametrize(
    ("greeting", "kind"),
    [
        (b"554 5.7.1 no service\r\n", Kind.REPLY),
        (b"421 busy\r\n", Kind.REPLY),
        (b"250 hello\r\n", Kind.PROTOCOL),  # RFC 5321 4.2: the greeting is 220
        (b"hello\r\n", Kind.PROTOCOL),
        (GREETING + b"250 extra\r\n", Kind.PROTOCOL),  # unsolicited text after the greeting
    ],
)
def test_bad_greetings(greeting: bytes, kind: Kind) -> None:
    client = Client("mail.tenant.test", TlsMode.NONE)
    client.receive(greeting)
    assert client.closed and client.failure is not None
    assert (client.failure.kind, client.failure.stage) == (kind, Stage.GREETING)
    assert client.data_to_send() == b""


def test_starttls_when_offered_then_ehlo_again() -> None:
    client = greeted(b"250-mx\r\n250-SIZE 10\r\n250 STARTTLS\r\n", TlsMode.MAY)
    assert client.data_to_send() == b"STARTTLS\r\n" and client.awaiting is Stage.STARTTLS
    client.receive(b"220 2.0.0 ready\r\n")
    assert client.state is State.HANDSHAKE and client.awaiting is None
    client.tls_started()
    # RFC 3207 4.2: what was offered in clear is forgotten; EHLO again.
    assert client.extensions == Extensions() and client.encrypted
    assert client.data_to_send() == b"EHLO mail.tenant.test\r\n"
    client.receive(b"250-mx\r\n250 STARTTLS\r\n")
    assert client.state is State.READY and client.data_to_send() == b""


def test_opportunistic_tls_refused_goes_on_in_clear() -> None:
    client = greeted(b"250-mx\r\n250 STARTTLS\r\n", TlsMode.MAY)
    client.data_to_send()
    client.receive(b"454 4.7.0 TLS not available\r\n")
    assert client.state is State.READY and not client.encrypted


def test_no_tls_mode_never_starts_tls() -> None:
    client = greeted(b"250-mx\r\n250 STARTTLS\r\n", TlsMode.NONE)
    assert client.state is State.READY and client.data_to_send() == b""


@pytest.mark.parametrize(
    ("ehlo", "starttls", "stage"),
    [
        (PLAIN, b"", Stage.EHLO),  # not offered
        (b"250-mx\r\n250 STARTTLS\r\n", b"454 4.7.0 TLS not available\r\n", Stage.STARTTLS),
    ],
)
def test_required_tls_never_falls_back(ehlo: bytes, starttls: bytes, stage: Stage) -> None:
    client = greeted(ehlo, TlsMode.VERIFY)
    client.data_to_send()
    client.receive(starttls)
    assert client.closed and client.failure is not None
    assert (client.failure.kind, client.failure.stage) == (Kind.TLS, stage)
    assert "TLS is required" in client.failure.words


def test_bytes_after_the_reply_to_starttls_end_the_session() -> None:
    client = greeted(b"250-mx\r\n250 STARTTLS\r\n", TlsMode.MAY)
    client.data_to_send()
    # Read over TLS, this injected reply would answer the EHLO sent after the handshake.
    client.receive(b"220 go\r\n250-evil\r\n250 AUTH PLAIN\r\n")
    assert client.closed and client.failure is not None
    assert (
        client.failure.kind is Kind.PROTOCOL
        and "after the reply to STARTTLS" in client.failure.words
    )


def test_a_failed_handshake_is_a_tls_failure() -> None:
    client = greeted(b"250-mx\r\n250 STARTTLS\r\n", TlsMode.MAY)
    client.receive(b"220 go\r\n")
    client.tls_failed("wrong version number")
    assert client.failure is not None
    assert (client.failure.kind, client.failure.stage) == (Kind.TLS, Stage.TLS)
    assert client.failure.words == "TLS handshake failed: wrong version number"


def test_a_reply_beyond_the_pipelined_group_is_a_violation() -> None:
    client = greeted()
    client.begin("alice@tenant.test", ["a@rcpt.test"], 5, False)
    client.data_to_send()
    client.receive(ACCEPT + ACCEPT + GO + b"250 surprise\r\n")
    assert client.closed and client.failure is not None
    assert (client.failure.kind, client.failure.stage) == (Kind.PROTOCOL, Stage.MESSAGE)
    assert failure(client.results()["a@rcpt.test"]).kind is Kind.PROTOCOL


def test_a_reply_before_its_command_is_a_violation() -> None:
    client = greeted(PLAIN)
    client.begin("alice@tenant.test", ["a@rcpt.test"], 5, False)
    client.data_to_send()
    client.receive(ACCEPT + b"250 2.1.5 ok\r\n")  # the RCPT reply came before RCPT
    assert client.closed and client.failure is not None
    assert client.failure.kind is Kind.PROTOCOL and client.data_to_send() == b""


def test_an_idle_session_closed_by_the_server_tells_the_next_transaction_why() -> None:
    client = greeted()
    client.receive(b"421 4.4.2 idle too long\r\n")  # RFC 5321 3.8
    assert client.closed and client.awaiting is None
    client.begin("alice@tenant.test", ["a@rcpt.test"], 5, False)
    result = failure(client.results()["a@rcpt.test"])
    assert (result.stage, result.slow_down) == (Stage.IDLE, True)
    assert result.words == "421 4.4.2 idle too long (while the session was idle)"


@pytest.mark.parametrize("data", [b"250 ok\r\n", b"2"])
def test_unsolicited_bytes_on_an_idle_session(data: bytes) -> None:
    client = greeted()
    client.receive(data)
    client.begin("alice@tenant.test", ["a@rcpt.test"], 5, False)
    result = failure(client.results()["a@rcpt.test"])
    assert result.kind is Kind.PROTOCOL and client.data_to_send() == b""


def test_a_close_in_the_middle_of_a_reply() -> None:
    client = greeted()
    client.begin("alice@tenant.test", ["a@rcpt.test"], 5, False)
    client.receive(ACCEPT + b"250-2.1.5 ok")
    client.receive_eof()
    result = failure(client.results()["a@rcpt.test"])
    assert (result.kind, result.stage) == (Kind.DROPPED, Stage.RCPT)
    assert result.words == (
        "connection closed by the server in the middle of a reply"
        " while waiting for the reply to RCPT TO"
    )


def test_a_timeout_fails_what_is_pending_and_keeps_what_is_settled() -> None:
    client = greeted()
    client.begin("alice@tenant.test", ["a@rcpt.test", "b@rcpt.test"], 5, False)
    client.receive(ACCEPT + b"550 5.1.1 no\r\n")
    client.timed_out(Stage.RCPT, 300)
    results = client.results()
    assert failure(results["a@rcpt.test"]).kind is Kind.REPLY
    assert failure(results["b@rcpt.test"]).words == (
        "timed out after 300 s waiting for the reply to RCPT TO"
    )


def test_rset_quit_and_a_refused_rset() -> None:
    client = greeted()
    client.reset()
    assert client.data_to_send() == b"RSET\r\n"
    client.receive(b"250 ok\r\n")
    client.reset()
    client.receive(b"500 what\r\n")
    assert client.closed and client.failure is not None and client.failure.stage is Stage.RSET
    client = greeted()
    client.quit()
    assert client.data_to_send() == b"QUIT\r\n" and client.awaiting is Stage.QUIT
    client.receive_eof()  # a server may close without 221
    assert client.closed and client.failure is None


def test_a_caller_mistake_is_an_error_not_a_failure() -> None:
    client = greeted()
    client.begin("alice@tenant.test", ["a@rcpt.test"], 5, False)
    with pytest.raises(RuntimeError):
        client.begin("alice@tenant.test", ["b@rcpt.test"], 5, False)
    with pytest.raises(RuntimeError):
        client.results()
    client.close()
    with pytest.raises(RuntimeError):
        client.begin("alice@tenant.test", ["b@rcpt.test"], 5, False)


def test_every_state_is_reachable_and_closed_is_final() -> None:
    reached = {State.GREETING}
    frontier = [State.GREETING]
    while frontier:
        state = frontier.pop()
        for (source, _), target in _NEXT.items():
            if source is state and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(State)
    assert {event for (source, event) in _NEXT if source is State.CLOSED} == {Event.CLOSE}


@pytest.mark.parametrize(
    ("line", "size"),
    [
        (b"SIZE", 0),
        (b"SIZE 0", 0),
        (b"SIZE 10", 10),
        (b"SIZE -1", 0),
        (b"SIZE 99999999999999999999999999", 0),  # RFC 1870 4: at most 20 digits
        (b"SIZE " + b"9" * 5000, 0),
        (b"SIZE abc", 0),
        ("SIZE ²".encode(), 0),  # str.isdigit says yes
        (b"SIZE \xb2", 0),
        (b"SIZE 1e9", 0),
        (b"AUTH PLAIN", None),
        (b"\xff\xfe\x00", None),
    ],
)
def test_ehlo_keywords_are_parsed_strictly(line: bytes, size: int | None) -> None:
    reader = ReplyReader()
    reader.feed(b"250-mx\r\n250-" + line + b"\r\n250 PIPELINING\r\n")
    reply = reader.next()
    assert reply is not None
    offered = parse_extensions(reply)
    assert offered.size == size and offered.pipelining and not offered.starttls
