"""Submission from remote clients: 587 with STARTTLS and 465 with TLS, AUTH as a tenant's
user, by Python's smtplib, swaks and PHPMailer from the lab's "internet".

Passwords are set with `nsmail tenant passwd`; the real supervisor runs the submission
front (as `nsmail-submit`, jailed) and hands each authenticated session to the worker of
the user's tenant, so what arrives at the real Postfix carries that tenant's identity. A
user of one tenant cannot submit as another: not with its password for the other's user,
not with the other's sender after AUTH. Nothing is taken before AUTH, AUTH not before TLS,
nothing injected before STARTTLS survives it, and failed logins are throttled.
"""

from __future__ import annotations

import datetime
import json
import pwd
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hosting import DUAL, NSMAIL, V4_ONLY, Hosting, dns_records
from lab import HOST_V4, HOST_V6, Lab, Nsd, Postfix

PASSWORDS = {"alice@bcd.test": "correct horse", "carol@cde.test": "battery staple"}
CLIENT = """
import json, smtplib, ssl, sys
port, user, password, sender, subject, cafile = sys.argv[1:7]
host = sys.argv[7]
context = ssl.create_default_context(cafile=cafile)
context.check_hostname = False
def send():
    if port == "465":
        smtp = smtplib.SMTP_SSL(host, 465, context=context, timeout=20)
    else:
        smtp = smtplib.SMTP(host, int(port), timeout=20)
        smtp.starttls(context=context)
    with smtp:
        smtp.login(user, password)
        head = f"From: {sender}\\r\\nTo: x1@rcpt.test\\r\\nSubject: {subject}\\r\\n"
        message = head + "\\r\\nhi\\r\\n"
        smtp.sendmail(sender, ["x1@rcpt.test"], message)
try:
    send()
    print(json.dumps({"ok": True}))
except smtplib.SMTPResponseException as e:
    print(json.dumps({"ok": False, "code": e.smtp_code, "text": e.smtp_error.decode()}))
"""
PHPMAILER = str(Path(__file__).parents[1] / "support" / "data" / "phpmailer.php")


@dataclass
class Site:
    lab: Lab
    hosting: Hosting
    postfix: Postfix
    cafile: Path

    def phpmailer(
        self, port: int, secure: str, user: str, password: str, subject: str, sender: str = ""
    ) -> str:
        """PHPMailer from the lab's internet with AUTH: "sent" or "refused: ..."."""
        argv = [str(port), secure, user, password, sender or user, subject]
        done = self.lab.run(self.lab.net, ["php", PHPMAILER, HOST_V4, *argv], check=False)
        assert done.returncode == 0, done.stderr
        return str(done.stdout).strip()

    def client(
        self, port: int, user: str, password: str, sender: str, subject: str, host: str = HOST_V4
    ) -> dict[str, object]:
        argv = [str(port), user, password, sender, subject, str(self.cafile), host]
        done = self.lab.run(self.lab.net, ["python3", "-c", CLIENT, *argv], check=False)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert isinstance(result, dict)
        return result

    def converse(self, port: int, lines: list[bytes]) -> list[str]:
        """Speak raw SMTP, in clear until a STARTTLS in `lines`; each reply's last line."""
        done = self.lab.run(
            self.lab.net,
            [
                "python3",
                "-c",
                RAW,
                HOST_V4,
                str(port),
                json.dumps([x.decode() for x in lines]),
                str(self.cafile),
            ],
            check=False,
        )
        assert done.returncode == 0, done.stderr
        replies = json.loads(done.stdout)
        assert isinstance(replies, list)
        return replies


RAW = """
import json, socket, ssl, sys
host, port, lines, cafile = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
context = ssl.create_default_context(cafile=cafile)
context.check_hostname = False
s = socket.create_connection((host, port), timeout=20)
f = s.makefile("rb")
def reply():
    got = [f.readline()]
    while got[-1][3:4] == b"-":
        got.append(f.readline())
    return got[-1].decode().strip()
out = [reply()]
for line in lines:
    s.sendall(line.encode())
    out.append(reply())
    if line.startswith("STARTTLS") and out[-1].startswith("220"):
        s = context.wrap_socket(s)
        f = s.makefile("rb")
print(json.dumps(out))
"""


def certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "abc.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("abc.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(mode=0o700)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    public = directory.parent / "ca.pem"
    public.write_bytes(cert_path.read_bytes())
    public.chmod(0o644)
    return cert_path, key_path


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with Lab() as lab:
        Nsd(lab, dns_records())
        postfix = Postfix(lab)
        hosting = Hosting(lab)
        cert, key = certificate(hosting.etc / "tls")
        smtpd = f'[smtpd]\ncertificate = "{cert}"\nkey = "{key}"\ntimeout = 5\n'
        hosting.write_config((DUAL, V4_ONLY), host_extra=smtpd)
        for user, password in PASSWORDS.items():
            local, _, domain = user.partition("@")
            done = subprocess.run(
                [NSMAIL, "--config", str(hosting.config_path), "tenant", "passwd", domain, local],
                input=password + "\n",
                capture_output=True,
                text=True,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert "no supervisor is running" in done.stdout
        hosting.start()
        yield Site(lab, hosting, postfix, cert.parent.parent / "ca.pem")


def received(message: EmailMessage) -> str:
    return " ".join(str(message["Received"]).split())


def test_the_credentials_file_is_roots_and_hashed(site: Site) -> None:
    path = site.hosting.etc / "submission.passwd"
    assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == 0
    text = path.read_text()
    assert "alice@bcd.test:$y$" in text and "correct horse" not in text


@pytest.mark.parametrize("port", [587, 465])
def test_smtplib_with_auth_submits_as_the_users_tenant(site: Site, port: int) -> None:
    result = site.client(
        port, "alice@bcd.test", "correct horse", "alice@bcd.test", f"smtplib {port}"
    )
    assert result == {"ok": True}
    message = site.postfix.arrived(f"smtplib {port}")
    assert received(message).startswith("from bcd.test (bcd.test [IPv6:2001:db8:51::70])")
    assert message["Message-ID"].endswith("@bcd.test>")


def test_swaks_with_starttls_and_auth_login(site: Site) -> None:
    done = site.lab.run(
        site.lab.net,
        [
            "swaks",
            "--server",
            HOST_V4,
            "--port",
            "587",
            "--tls",
            "--auth",
            "LOGIN",
            "--auth-user",
            "carol@cde.test",
            "--auth-password",
            "battery staple",
            "--from",
            "carol@cde.test",
            "--to",
            "x1@rcpt.test",
            "--header",
            "Subject: swaks 587",
        ],
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    message = site.postfix.arrived("swaks 587")
    assert received(message).startswith("from cde.test (cde.test [198.51.100.71])")


@pytest.mark.parametrize("port, secure", [(587, "tls"), (465, "ssl")])
def test_phpmailer_with_auth(site: Site, port: int, secure: str) -> None:
    sent = site.phpmailer(port, secure, "alice@bcd.test", "correct horse", f"phpmailer {port}")
    assert sent == "sent"
    site.postfix.arrived(f"phpmailer {port}")


def test_a_user_cannot_submit_as_another_tenant(site: Site) -> None:
    # Its own password for the other tenant's user: refused.
    wrong = site.client(587, "carol@cde.test", "correct horse", "carol@cde.test", "forged 1")
    assert wrong["ok"] is False and wrong["code"] == 535
    # Authenticated as itself, the other tenant's sender: refused as nsmail-sendmail refuses.
    sender = site.client(587, "alice@bcd.test", "correct horse", "carol@cde.test", "forged 2")
    assert sender["ok"] is False and sender["code"] == 553
    assert "is not in bcd.test" in str(sender["text"])
    swaks = site.lab.run(
        site.lab.net,
        [
            "swaks",
            "--server",
            HOST_V4,
            "--port",
            "465",
            "--tls-on-connect",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice@bcd.test",
            "--auth-password",
            "correct horse",
            "--from",
            "carol@cde.test",
            "--to",
            "x1@rcpt.test",
            "--header",
            "Subject: forged 3",
        ],
        check=False,
    )
    assert "553 5.7.1" in swaks.stdout, swaks.stdout
    php = site.phpmailer(
        587, "tls", "alice@bcd.test", "correct horse", "forged 4", "carol@cde.test"
    )
    assert php.startswith("refused:") and "SMTP code: 553" in php, php
    time.sleep(1)
    assert not [m for m in site.postfix.messages() if str(m["Subject"]).startswith("forged")]


def test_nothing_before_auth_no_auth_before_tls_no_injection(site: Site) -> None:
    replies = site.converse(
        587,
        [
            b"EHLO c.test\r\n",
            b"MAIL FROM:<alice@bcd.test>\r\n",
            b"AUTH PLAIN AGFsaWNlQGJjZC50ZXN0AGNvcnJlY3QgaG9yc2U=\r\n",
            # Injected in clear behind STARTTLS (CVE-2011-0411): thrown away.
            b"STARTTLS\r\nMAIL FROM:<alice@bcd.test>\r\n",
            b"EHLO c.test\r\n",
            b"MAIL FROM:<alice@bcd.test>\r\n",
        ],
    )
    assert replies[0].startswith("220 abc.test ESMTP")
    assert replies[1] == "250 STARTTLS"
    assert replies[2] == "530 5.7.0 authentication required"
    assert replies[3] == "538 5.7.11 encryption required: STARTTLS first"
    assert replies[4] == "220 2.0.0 ready to start TLS"
    assert replies[5] == "250 AUTH PLAIN LOGIN"
    assert replies[6] == "530 5.7.0 authentication required"


def test_failed_logins_are_throttled_per_address(site: Site) -> None:
    """Over IPv6, from an address (a /64) that no other test logs in from."""

    def login(password: str, host: str = HOST_V6) -> object:
        return site.client(465, "alice@bcd.test", password, "alice@bcd.test", "x", host)["code"]

    # smtplib's login() tries PLAIN, then LOGIN: two failed AUTHs a call. The fifth
    # failure (the third call's PLAIN) blocks the rest: its LOGIN already gets 454.
    assert [login(f"guess {n}") for n in range(4)] == [535, 535, 454, 454]
    # The right password from the throttled address waits out the window too...
    assert login("correct horse") == 454
    # ... while another address logs in.
    assert site.client(465, "alice@bcd.test", "correct horse", "alice@bcd.test", "other")["ok"]
    assert "authentication failed for 'alice@bcd.test'" in site.hosting.log()


def test_the_front_runs_jailed_as_its_own_user(site: Site) -> None:
    jail = site.hosting.run_dir / "empty"
    fronts = [
        p.parent
        for p in Path("/proc").glob("[0-9]*/comm")
        if _read(p) == "nsmail submissi\n" and _root(p.parent) == jail
    ]
    assert len(fronts) == 1
    assert site.hosting.proc_uid(int(fronts[0].name)) == pwd.getpwnam("nsmail-submit").pw_uid


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _root(proc: Path) -> Path | None:
    try:
        return (proc / "root").resolve()
    except OSError:
        return None
