"""SMTP submission to nsmail's listeners, by real clients run as tenants' users on the host.

Python's smtplib, swaks and PHPMailer (Debian's libphp-phpmailer) connect to the local
listeners (127.0.0.1:25, [::1]:25, the Unix socket) as a tenant's uid, with no password:
the kernel names the uid, the tenant's own worker serves the session as the tenant, and
what arrives at the real Postfix carries the tenant's identity. The same checks as
`nsmail-sendmail` apply (a sender of another tenant's domain: 553 5.7.1), and a hostile
client (bare LF, too many connections, silence) meets its refusal without stalling the
other tenant or the supervisor. Remote submission (587, 465, AUTH) is
`test_submission_e2e.py`'s.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from attacker import Attacker
from hosting import DUAL, V4_ONLY, Hosting, dns_records
from lab import Lab, Nsd, Postfix

CLIENT_LIMIT = 3
TIMEOUT = 2  # [smtpd] timeout: seconds a silent client is given
SMTPLIB = """
import smtplib
host, port, sender, recipient, subject = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
message = f"From: {sender}\\r\\nTo: {recipient}\\r\\nSubject: {subject}\\r\\n\\r\\nhello\\r\\n"
with smtplib.SMTP(host, port, timeout=20) as smtp:
    smtp.ehlo("app.test")
    features = dict(smtp.esmtp_features)
    try:
        refused = smtp.sendmail(sender, [recipient], message)
        print(json.dumps({"ok": True, "refused": refused, "size": features.get("size")}))
    except smtplib.SMTPResponseException as e:
        print(json.dumps({"ok": False, "code": e.smtp_code, "text": e.smtp_error.decode()}))
    except smtplib.SMTPRecipientsRefused as e:
        print(json.dumps({"ok": False, "refused": str(e.recipients)}))
"""
PHPMAILER = str(Path(__file__).parents[1] / "support" / "data" / "phpmailer.php")


@dataclass
class Site:
    lab: Lab
    hosting: Hosting
    postfix: Postfix
    bcd: Attacker  # a user of bcd.test (dual stack)
    cde: Attacker  # a user of cde.test (IPv4 only)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with Lab() as lab:
        Nsd(lab, dns_records())
        postfix = Postfix(lab)
        hosting = Hosting(lab)
        smtpd = f"[smtpd]\ntimeout = {TIMEOUT}\nclient_limit = {CLIENT_LIMIT}\n"
        hosting.write_config((DUAL, V4_ONLY), host_extra=smtpd)
        hosting.start()
        users = [
            Attacker(
                lab,
                t.domain,
                hosting.uid(t.domain),
                hosting.uid(t.domain),
                hosting.home(t.domain),
                hosting.config_path,
            )
            for t in (DUAL, V4_ONLY)
        ]
        yield Site(lab, hosting, postfix, *users)


def received(message: EmailMessage) -> str:
    return " ".join(str(message["Received"]).split())


def smtplib_send(user: Attacker, host: str, sender: str, subject: str) -> dict[str, object]:
    result = user.python(SMTPLIB, host, 25, sender, "x1@rcpt.test", subject)
    assert isinstance(result, dict)
    return result


def test_smtplib_on_loopback_submits_as_the_tenant(site: Site) -> None:
    """127.0.0.1 and ::1: the tenant's identity at the receiver, SIZE announced."""
    for host, subject in (("127.0.0.1", "smtplib v4"), ("::1", "smtplib v6")):
        result = smtplib_send(site.bcd, host, "alice@bcd.test", subject)
        assert result == {"ok": True, "refused": {}, "size": str(25 << 20)}
        message = site.postfix.arrived(subject)
        assert received(message).startswith("from bcd.test (bcd.test [IPv6:2001:db8:51::70])")
        assert message["Message-ID"].endswith("@bcd.test>")
        assert message["Return-Path"] == "<alice@bcd.test>"


def test_swaks_on_the_unix_socket_and_loopback(site: Site) -> None:
    socket_path = site.hosting.run_dir / "smtp"
    assert socket_path.stat().st_mode & 0o777 == 0o666
    for where, subject in (
        (["--socket", str(socket_path)], "swaks unix"),
        (["--server", "127.0.0.1"], "swaks tcp"),
    ):
        done = site.cde.run(
            [
                "swaks",
                *where,
                "--from",
                "carol@cde.test",
                "--to",
                "x1@rcpt.test",
                "--header",
                f"Subject: {subject}",
                "--body",
                "hello",
                "--helo",
                "app.test",
            ]
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "250 2.0.0 Ok: queued as" in done.stdout
        message = site.postfix.arrived(subject)
        assert received(message).startswith("from cde.test (cde.test [198.51.100.71])")


def phpmailer(user: Attacker, sender: str, subject: str) -> str:
    """PHPMailer to 127.0.0.1:25, without TLS or AUTH: "sent" or "refused: ..."."""
    done = user.run(["php", PHPMAILER, "127.0.0.1", "25", "", "", "", sender, subject])
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_phpmailer_on_loopback(site: Site) -> None:
    assert phpmailer(site.bcd, "alice@bcd.test", "phpmailer local") == "sent"
    message = site.postfix.arrived("phpmailer local")
    assert received(message).startswith("from bcd.test (bcd.test [IPv6:2001:db8:51::70])")


def test_a_tenant_cannot_submit_as_another_by_any_client(site: Site) -> None:
    """cde.test's user with bcd.test's sender: refused by smtplib, swaks and PHPMailer."""
    result = smtplib_send(site.cde, "127.0.0.1", "alice@bcd.test", "forged smtplib")
    assert result["ok"] is False and result["code"] == 553
    assert "5.7.1 sender alice@bcd.test is not in cde.test" in str(result["text"])
    swaks = site.cde.run(
        [
            "swaks",
            "--server",
            "::1",
            "--from",
            "alice@bcd.test",
            "--to",
            "x1@rcpt.test",
            "--header",
            "Subject: forged swaks",
        ]
    )
    assert "553 5.7.1" in swaks.stdout, swaks.stdout
    php = phpmailer(site.cde, "alice@bcd.test", "forged phpmailer")
    assert php.startswith("refused:") and "SMTP code: 553" in php, php
    time.sleep(1)
    assert not [m for m in site.postfix.messages() if str(m["Subject"]).startswith("forged")]


def test_a_bare_lf_in_data_is_refused(site: Site) -> None:
    replies = site.bcd.python(
        """
s = socket.create_connection(("127.0.0.1", 25), timeout=10)
f = s.makefile("rb")
def reply():
    lines = [f.readline()]
    while lines[-1][3:4] == b"-":
        lines.append(f.readline())
    return lines[-1].decode().strip()
out = [reply()]
for line in (b"EHLO app.test", b"MAIL FROM:<alice@bcd.test>", b"RCPT TO:<x1@rcpt.test>", b"DATA"):
    s.sendall(line + b"\\r\\n"); out.append(reply())
s.sendall(b"Subject: smuggled\\r\\n\\r\\nhello\\n.\\nMAIL FROM:<x@y.test>\\r\\n.\\r\\n")
out.append(reply())
s.sendall(b"QUIT\\r\\n"); out.append(reply())
print(json.dumps(out))
"""
    )
    assert replies[-2] == "550 5.5.2 message refused: a line ends in a bare LF or CR"
    assert replies[-1].startswith("221")


def test_too_many_and_silent_clients_stall_nobody(site: Site) -> None:
    """cde.test's user holds CLIENT_LIMIT silent connections: one more is refused with
    421; they are timed out; meanwhile bcd.test submits and `nsmail status` answers."""
    outcome = site.cde.python(
        """
import time
limit, timeout = int(sys.argv[1]), float(sys.argv[2])
held = [socket.create_connection(("127.0.0.1", 25), timeout=10) for _ in range(limit)]
greetings = [s.recv(512).decode() for s in held]
extra = socket.create_connection(("127.0.0.1", 25), timeout=10)
refused = extra.recv(512).decode()
started = time.monotonic()
ends = [s.recv(512).decode() for s in held]
print(json.dumps({"greetings": greetings, "refused": refused, "ends": ends,
                  "waited": time.monotonic() - started}))
""",
        CLIENT_LIMIT,
        TIMEOUT,
    )
    assert all(g.startswith("220 cde.test ESMTP") for g in outcome["greetings"])
    assert outcome["refused"].startswith("421 4.7.0 cde.test too many sessions from you")
    assert all(e.startswith("421 4.4.2 cde.test timeout") for e in outcome["ends"])
    result = smtplib_send(site.bcd, "127.0.0.1", "alice@bcd.test", "not stalled")
    assert result["ok"] is True
    site.postfix.arrived("not stalled")
    assert site.hosting.nsmail("status").returncode == 0


def test_another_local_user_submits_as_the_host(site: Site) -> None:
    """A uid of no tenant is the hosting machine's user, as with nsmail-sendmail."""
    nobody = dataclasses.replace(site.bcd, domain="abc.test", uid=65534, gid=65534)
    refused = smtplib_send(nobody, "127.0.0.1", "alice@bcd.test", "nobody as bcd")
    assert refused["ok"] is False and refused["code"] == 553
    result = smtplib_send(nobody, "127.0.0.1", "nobody@abc.test", "nobody as host")
    assert result["ok"] is True, json.dumps(result)
    message = site.postfix.arrived("nobody as host")
    assert message["Return-Path"] == "<nobody@abc.test>"


def test_an_asleep_tenant_is_woken_for_a_client() -> None:
    with Lab() as lab:
        Nsd(lab, dns_records())
        postfix = Postfix(lab)
        hosting = Hosting(lab)
        hosting.write_config((DUAL,), idle_exit=1)
        hosting.start()
        hosting.wait_status(lambda s: s[DUAL.domain]["state"] == "asleep")
        uid = hosting.uid(DUAL.domain)
        user = Attacker(lab, DUAL.domain, uid, uid, hosting.home(DUAL.domain), hosting.config_path)
        result = smtplib_send(user, "127.0.0.1", "alice@bcd.test", "woken")
        assert result["ok"] is True, result
        site = Site(lab, hosting, postfix, user, user)
        assert received(site.postfix.arrived("woken")).startswith("from bcd.test (bcd.test")
