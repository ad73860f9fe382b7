"""The pure parts of nsmail's SMTP service: AUTH and STARTTLS in the server core, the
bare-newline refusal, the login throttle, the suspend rule, the handoff codec, the
credentials file, the restrict_smtp chain and the [smtpd] keys."""

from __future__ import annotations

import base64
from ipaddress import IPv4Address, IPv6Address

import pytest
from configs import BCD, BRIDGE, HOST, LOOKUP, MAIN, USERS
from hypothesis import given
from hypothesis import strategies as st

from nsmail.core import credentials, firewall, sessionhandoff, suspend
from nsmail.core.config import Account, ConfigError, SystemLookup, parse
from nsmail.core.smtp import auth
from nsmail.core.smtp.server import (
    NEED_DATA,
    Aborted,
    Authenticate,
    Closed,
    Content,
    EndOfMessage,
    Event,
    Output,
    Policy,
    Reply,
    Server,
    StartTls,
)
from nsmail.core.throttle import LoginThrottle, client_key

FRONT = Policy(starttls=True, auth=True)


class Client:
    """Feeds a server and answers its decisions with `replies` (None: positive)."""

    def __init__(self, server: Server, **replies: Reply) -> None:
        self.server = server
        self.replies = replies
        self.lines: list[str] = []
        self.events: list[Event] = []

    def send(self, data: bytes) -> Client:
        self.server.receive(data)
        while (event := self.server.next_event()) is not NEED_DATA:
            if isinstance(event, Output):
                self.lines += event.data.decode().splitlines()
                continue
            self.events.append(event)
            if isinstance(event, Closed):
                break
            if not isinstance(event, Content | Aborted):
                self.server.answer(self.replies.get(type(event).__name__))
            if isinstance(event, Authenticate) and self.server.authenticated:
                reply = self.server.next_event()  # as a front does: the rest is the worker's
                assert isinstance(reply, Output)
                self.lines += reply.data.decode().splitlines()
                break
        return self

    @property
    def last(self) -> str:
        return self.lines[-1]


def plain(user: str, password: str, authzid: str = "") -> str:
    return auth.encode_plain(user, password, authzid)


# -- AUTH and STARTTLS ------------------------------------------------------------------


def test_a_front_offers_starttls_in_clear_and_auth_only_under_tls() -> None:
    client = Client(Server("abc.test", policy=FRONT)).send(b"EHLO c.test\r\n")
    assert client.last == "250 STARTTLS" and not any("AUTH" in line for line in client.lines)
    client.send(b"AUTH PLAIN " + plain("a@bcd.test", "pw").encode() + b"\r\n")
    assert client.last == "538 5.7.11 encryption required: STARTTLS first"
    client.send(b"MAIL FROM:<a@bcd.test>\r\n")
    assert client.last == "530 5.7.0 authentication required"
    client.send(b"STARTTLS\r\nEHLO injected.test\r\n")
    assert client.events[-1] == StartTls() and client.last == "220 2.0.0 ready to start TLS"
    client.send(b"MAIL FROM:<injected@bcd.test>\r\n")  # nothing counts before TLS is on
    assert client.last == "220 2.0.0 ready to start TLS"
    client.server.tls_started()  # what was sent in clear after STARTTLS is thrown away
    client.send(b"EHLO c.test\r\n")
    assert "250 AUTH PLAIN LOGIN" in client.lines and "STARTTLS" not in client.lines[-1]
    assert client.server.unread() == b""


def test_auth_plain_and_login_give_the_credentials() -> None:
    tls = Policy(tls=True, auth=True)
    client = Client(Server("abc.test", policy=tls)).send(b"EHLO c.test\r\n")
    client.send(f"AUTH PLAIN {plain('a@bcd.test', 'p w')}\r\n".encode())
    assert client.events[-1] == Authenticate("PLAIN", auth.Credentials("a@bcd.test", "p w"))
    assert client.last == "235 2.7.0 authentication successful"
    client.send(b"AUTH LOGIN\r\n")
    assert client.last == "503 5.5.1 already authenticated"
    client.send(b"MAIL FROM:<a@bcd.test>\r\n")
    assert client.last == "250 2.1.0 Ok"

    login = Client(Server("abc.test", policy=tls), Authenticate=Reply(535, "5.7.8 no"))
    login.send(b"EHLO c.test\r\nAUTH LOGIN\r\n")
    assert login.last == f"334 {auth.USERNAME_PROMPT}"
    login.send(base64.b64encode(b"b@bcd.test") + b"\r\n")
    assert login.last == f"334 {auth.PASSWORD_PROMPT}"
    login.send(base64.b64encode("pässword".encode()) + b"\r\n")
    assert login.events[-1] == Authenticate("LOGIN", auth.Credentials("b@bcd.test", "pässword"))
    assert login.last == "535 5.7.8 no" and not login.server.authenticated
    login.send(b"AUTH PLAIN\r\n")
    assert login.last == "334 "
    login.send(b"*\r\n")
    assert login.last == "501 5.0.0 authentication canceled"
    login.send(b"AUTH PLAIN !!!\r\nAUTH CRAM-MD5\r\n")
    assert login.lines[-2:] == [
        "501 5.5.2 response is not base64",
        "504 5.5.4 unrecognized authentication type",
    ]


def test_what_a_client_pipelines_after_auth_is_left_for_the_worker() -> None:
    client = Client(Server("abc.test", policy=Policy(tls=True, auth=True)))
    response = plain("a@bcd.test", "pw")
    client.send(f"EHLO c.test\r\nAUTH PLAIN {response}\r\nMAIL FROM:<a@bcd.test>\r\n".encode())
    assert client.last == "235 2.7.0 authentication successful"
    # The front stops at the answer (it takes no more events): MAIL was not parsed.
    assert client.server.unread() == b"MAIL FROM:<a@bcd.test>\r\n"


def test_a_session_a_front_authenticated_goes_on_without_greeting() -> None:
    client = Client(Server("bcd.test", policy=Policy(greet=False)))
    client.send(b"AUTH PLAIN x\r\nSTARTTLS\r\nMAIL FROM:<a@bcd.test>\r\n")
    assert client.lines == [
        "503 5.5.1 already authenticated",
        "502 5.5.1 command not implemented",
        "250 2.1.0 Ok",
    ]


@pytest.mark.parametrize(
    "response", ["", "YQ==", plain("", "pw"), plain("a@b.test", ""), "x" * 2000, "w6k\n"]
)
def test_responses_that_are_no_credentials(response: str) -> None:
    with pytest.raises(auth.AuthError):
        auth.decode_plain(response)


def test_credentials_never_show_their_password() -> None:
    found = auth.decode_plain(plain("a@bcd.test", "secret", "other@bcd.test"))
    assert "secret" not in repr(found) and not found.acts_as_itself


@given(st.binary(max_size=300))
def test_any_auth_response_is_a_reply_never_a_crash(junk: bytes) -> None:
    client = Client(Server("abc.test", policy=Policy(tls=True, auth=True)))
    client.send(b"EHLO c.test\r\nAUTH LOGIN\r\n").send(junk.replace(b"\n", b"") + b"\r\n")
    assert client.last[:3] in ("334", "501", "500")


# -- bare newlines ------------------------------------------------------------------------

ENVELOPE = b"EHLO c.test\r\nMAIL FROM:<a@bcd.test>\r\nRCPT TO:<x@rcpt.test>\r\nDATA\r\n"


@pytest.mark.parametrize(
    "body",
    [b"a\nb\r\n", b"a\rb\r\n", b"hello\n.\nMAIL FROM:<x@y>\r\n", b"x\r\r\n", b"x\n\r\n"],
)
def test_a_bare_lf_or_cr_refuses_the_message_over_the_network(body: bytes) -> None:
    client = Client(Server("bcd.test", policy=Policy(bare_newlines=False)))
    client.send(ENVELOPE + body + b".\r\nNOOP\r\n")
    assert client.lines[-2:] == [
        "550 5.5.2 message refused: a line ends in a bare LF or CR",
        "250 2.0.0 Ok",
    ]
    assert Aborted("a bare LF or CR") in client.events and EndOfMessage() not in client.events


def test_sendmail_bs_still_takes_a_bare_lf() -> None:
    client = Client(Server("bcd.test")).send(ENVELOPE + b"a\nb\r\n.\r\n")
    assert client.last == "250 2.0.0 Ok" and EndOfMessage() in client.events


def test_crlf_split_across_reads_is_no_bare_newline() -> None:
    client = Client(Server("bcd.test", policy=Policy(bare_newlines=False)))
    client.send(ENVELOPE + b"line one\r").send(b"\nline two\r").send(b"\n.\r").send(b"\n")
    assert client.last == "250 2.0.0 Ok"
    assert (
        b"".join(e.data for e in client.events if isinstance(e, Content))
        == b"line one\r\nline two\r\n"
    )


# -- the login throttle -------------------------------------------------------------------


def test_failures_within_the_window_block_until_it_passes() -> None:
    throttle = LoginThrottle(limit=3, window=60.0)
    for t in (0.0, 10.0, 20.0):
        assert not throttle.blocked("203.0.113.9", t)
        throttle.failed("203.0.113.9", t)
    assert throttle.blocked("203.0.113.9", 79.0)
    assert not throttle.blocked("203.0.113.10", 21.0)
    assert not throttle.blocked("203.0.113.9", 80.0)  # a window after the last failure
    throttle.failed("203.0.113.9", 100.0)
    throttle.succeeded("203.0.113.9")
    assert len(throttle) == 0


def test_memory_is_bounded_by_capacity() -> None:
    throttle = LoginThrottle(limit=1, capacity=100)
    for n in range(10_000):
        throttle.failed(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", 1.0)
    assert len(throttle) == 100
    assert throttle.blocked("10.0.39.15", 2.0)  # the latest are kept


def test_an_ipv6_client_counts_by_its_64() -> None:
    assert (
        client_key("2001:db8:1:2:3:4:5:6") == client_key("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    )
    assert client_key("::ffff:203.0.113.9") == "203.0.113.9"
    assert client_key("203.0.113.9") == "203.0.113.9"


# -- the suspend rule ---------------------------------------------------------------------


def test_the_rule_needs_the_minimum_and_more_than_the_share() -> None:
    rule = suspend.parse("30% of 50")
    assert rule == suspend.SuspendRule(30.0, 50) and str(rule) == "30% of 50"
    assert suspend.exceeded(rule, {"sent": 30, "deferred": 10, "bounced": 9}) is None  # 49
    assert suspend.exceeded(rule, {"sent": 35, "deferred": 10, "bounced": 5}) is None  # 30% even
    why = suspend.exceeded(rule, {"sent": 34, "deferred": 10, "bounced": 6})
    assert why == (
        "16 of 50 outcomes in the last hour were deferrals or bounces, over suspend_rate 30% of 50"
    )


@pytest.mark.parametrize("text", ["30%", "30 of 50", "100% of 5", "30% of 0", "-1% of 5", "x"])
def test_what_is_no_rule(text: str) -> None:
    assert suspend.parse(text) is None


# -- the handoff --------------------------------------------------------------------------


def test_a_handoff_round_trips_and_names_its_domain() -> None:
    local = sessionhandoff.Handoff("uid 1001 from [127.0.0.1]:4711", uid=1001)
    remote = sessionhandoff.Handoff("[203.0.113.9]:5000", user="alice@BCD.test")
    for h in (local, remote):
        assert sessionhandoff.decode(sessionhandoff.encode(h)) == h
    assert (local.domain, remote.domain) == (None, "bcd.test")


@pytest.mark.parametrize(
    "data",
    [
        b'{"client": "x", "uid": 1, "user": "a@b.test"}',
        b'{"client": "x", "uid": null, "user": null}',
        b'{"client": "x", "uid": -1, "user": null}',
        b'{"client": "x", "uid": null, "user": "nobody"}',
        b'{"client": "x\\n", "uid": 1, "user": null}',
        b'{"client": "x", "uid": 1, "user": null, "root": true}',
        b"[]",
        b"\xff",
        b"x" * 2000,
    ],
)
def test_what_is_no_handoff(data: bytes) -> None:
    with pytest.raises(sessionhandoff.HandoffError):
        sessionhandoff.decode(data)


# -- the credentials file -----------------------------------------------------------------


def test_the_file_round_trips_and_logins_are_lower_case() -> None:
    entries = {credentials.login("Alice", "BCD.test"): "$y$j9T$salt$hash"}
    assert entries == {"alice@bcd.test": "$y$j9T$salt$hash"}
    text = credentials.render(entries)
    assert credentials.parse(text) == entries
    assert credentials.of_domains(entries, frozenset({"cde.test"})) == {}


@pytest.mark.parametrize(
    "text",
    ["alice@bcd.test\n", "alice:$y$x\n", "a@bcd.test:plain\n", "a@b.test:$y$x\na@b.test:$y$y\n"],
)
def test_a_bad_line_is_named(text: str) -> None:
    with pytest.raises(credentials.CredentialsError, match="line"):
        credentials.parse(text)


# -- restrict_smtp ------------------------------------------------------------------------


def test_restrict_smtp_is_a_chain_of_the_table() -> None:
    lines = firewall.table(frozenset(), frozenset({990, 0})).splitlines()
    chain = lines[lines.index("\tchain restrict_smtp {") :]
    assert [line.strip() for line in chain[1:6]] == [
        "type filter hook output priority filter; policy accept;",
        "oif lo accept",
        "meta skuid { 0, 990 } accept",
        "tcp dport { 25, 465, 587 } tcp flags & (syn | ack) == syn reject with tcp reset",
        "}",
    ]
    assert "restrict_smtp" not in firewall.table(frozenset())


# -- [smtpd] ------------------------------------------------------------------------------


SUBMIT_LOOKUP = SystemLookup(
    user={**USERS, "nsmail-submit": Account(992, 992, "/nonexistent")}.get,
    lstat=LOOKUP.lstat,
    default_resolvers=LOOKUP.default_resolvers,
)


def test_smtpd_defaults_listen_on_loopback_and_not_remote() -> None:
    config = parse([(MAIN, HOST + BRIDGE + BCD)], LOOKUP)
    assert config.smtpd.local == ((IPv4Address("127.0.0.1"), 25), (IPv6Address("::1"), 25))
    assert config.smtpd.socket and not config.smtpd.remote
    assert not config.host.restrict_smtp and config.delivery.suspend_rate is None


def test_smtpd_with_a_certificate_listens_on_587_and_465() -> None:
    smtpd = '[smtpd]\ncertificate = "/etc/ssl/a.pem"\nkey = "/etc/ssl/a.key"\nlocal = []\n'
    text = HOST.replace("[host]\n", "[host]\nrestrict_smtp = true\n") + smtpd + BRIDGE + BCD
    config = parse(
        [(MAIN, text.replace("[[tenant]]", 'suspend_rate = "10% of 5"\n[[tenant]]', 0))],
        SUBMIT_LOOKUP,
    )
    assert config.smtpd.remote and config.smtpd.uid == 992 and config.smtpd.local == ()
    assert [port for _, port in config.smtpd.submission + config.smtpd.submissions] == [
        587,
        587,
        465,
        465,
    ]
    assert config.host.restrict_smtp


@pytest.mark.parametrize(
    "smtpd, field, message",
    [
        ('certificate = "/a.pem"', "smtpd.key", "give certificate and key together"),
        ('local = ["0.0.0.0:25"]', "smtpd.local[0]", "'0.0.0.0' is not a loopback address"),
        ('local = ["127.0.0.1:25", "127.0.0.1:25"]', "smtpd.local", "listed twice"),
        (
            'certificate = "/a.pem"\nkey = "/a.key"\nuser = "nsmail"',
            "smtpd.user",
            "also the uid of host.user",
        ),
        ('certificate = "/a.pem"\nkey = "/a.key"', "smtpd.user", "unknown user 'nsmail-submit'"),
        ("nope = 1", "smtpd.nope", "unknown key"),
    ],
)
def test_bad_smtpd(smtpd: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse([(MAIN, HOST + f"[smtpd]\n{smtpd}\n" + BRIDGE + BCD)], LOOKUP)
    assert caught.value.field == field and message in caught.value.message


def test_a_bad_suspend_rate_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        parse([(MAIN, HOST + BRIDGE + '[delivery]\nsuspend_rate = "half"\n' + BCD)], LOOKUP)
    assert caught.value.field == "delivery.suspend_rate"
