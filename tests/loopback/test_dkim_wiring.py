"""DKIM wired in: configuration keys, the worker signing what it sends and its bounces,
`nsmail check` and `nsmail dkim keygen`."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dkim as dkimpy
import pytest
from configs import BRIDGE, HOST, LOOKUP, MAIN, tenant
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from dns_servers import DNSStack, dns_stack
from loopback_tenant import ZONE, make_tenant
from mailboxes import mailbox
from polling import wait_for
from smtp_servers import Recorder, smtp_server
from workers import stop, submit

from nsmail.commands import cli, preflight
from nsmail.core import dkim
from nsmail.core.config import ConfigError, DeliveryConfig, parse
from nsmail.core.preflight import DkimKey
from nsmail.tenant import worker
from nsmail.tenant.dkim import load_signer
from nsmail.tenant.spool import SPOOL_IN_HOME, Spool


@pytest.mark.parametrize(
    ("fields", "field", "problem"),
    [
        ({"dkim_selector": "s1"}, "dkim_key", "together"),
        ({"dkim_key": "/etc/nsmail/dkim/k"}, "dkim_selector", "together"),
        ({"dkim_selector": "s_1", "dkim_key": "/k"}, "dkim_selector", "not a selector"),
        ({"dkim_selector": "s1", "dkim_key": "k"}, "dkim_key", "absolute"),
        ({"dkim_selector": "s1", "dkim_key": "/srv/tenants/bcd/k"}, "dkim_key", "home of bcd"),
        ({"dkim_selector": "s1", "dkim_key": "/srv/tenants/cde/k"}, "dkim_key", "home of cde"),
    ],
)
def test_config_refuses(fields: dict[str, object], field: str, problem: str) -> None:
    cde = '[[tenant]]\ndomain = "cde.test"\nipv4 = "198.51.100.71"\nuser = "cde"\n'
    with pytest.raises(ConfigError) as caught:
        parse([(MAIN, HOST + BRIDGE + tenant(**fields) + cde)], LOOKUP)
    assert caught.value.field == f"tenant[0].{field}" and problem in caught.value.message


def test_config_takes_both() -> None:
    config = parse([(MAIN, HOST + BRIDGE + tenant(dkim_selector="S1", dkim_key="/k"))], LOOKUP)
    assert (config.tenants[0].dkim_selector, config.tenants[0].dkim_key) == ("s1", Path("/k"))


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSStack]:
    with dns_stack(ZONE) as stack:
        yield stack


@pytest.mark.needs("root")  # the worker chroots into its home
def test_the_worker_signs_what_it_sends_and_its_bounces(dns: DNSStack, tmp_path: Path) -> None:
    home = tmp_path / "home"
    spool = Spool(home / SPOOL_IN_HOME)
    spool.create()
    key_path = tmp_path / "s1.key"
    key = ed25519.Ed25519PrivateKey.generate()
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    txt = "".join(
        re.findall(r'"([^"]*)"', dkim.dns_record(dkim.Signer("tenant.test", "s1", key)))
    ).encode()
    recorder = Recorder(rcpt_replies={"nobody": "550 5.1.1 no such user"})
    channel = dns.channel()
    with smtp_server(recorder) as port:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                t = dataclasses.replace(make_tenant(home), dkim_selector="s1", dkim_key=key_path)
                serving = worker.prepare(
                    t,
                    DeliveryConfig(timeout=5, port=port, scan_interval=3600),
                    channel,
                    home=Path("/"),
                    host_name="abc.test",
                )
                os.chroot(home)
                os.chdir("/")
                serving.run()
                code = 0
            finally:
                os._exit(code)
        try:
            submit(spool, ("a@rcpt.test", "nobody@rcpt.test"))
            wait_for(lambda: recorder.received and mailbox(home, "alice"))
        finally:
            assert os.waitstatus_to_exitcode(stop(pid)) == 0

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        assert name == b"s1._domainkey.tenant.test."
        return txt

    sent = recorder.received[0].content
    assert sent.startswith(b"DKIM-Signature: ")
    assert dkimpy.verify(sent, dnsfunc=lookup)
    bounce = next((home / "mail" / "alice" / "new").iterdir()).read_bytes()
    assert b"MAILER-DAEMON@mail.tenant.test" in bounce
    assert dkimpy.verify(re.sub(rb"\r\n|\n", b"\r\n", bounce), dnsfunc=lookup)


@pytest.mark.needs("root")  # the home is the tenant's
def test_cli_keygen_then_check(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(tempfile.mkdtemp(prefix="nsmail-dkimcli-"))
    home = root / "home"
    home.mkdir()
    os.chown(home, 47401, 47401)
    config = root / "nsmail.toml"
    base = (
        '[host]\nname = "abc.test"\nuser = "nobody"\nresolvers = ["203.0.113.53"]\n'
        '[network]\nmode = "routed"\n'
        f'[[tenant]]\ndomain = "bcd.test"\nipv4 = "198.51.100.70"\nuid = 47401\ngid = 47401\n'
        f'home = "{home}"\n'
    )
    config.write_text(base)
    try:
        assert (
            cli.main(["--config", str(config), "dkim", "keygen", "bcd.test", "--type", "ed25519"])
            == 0
        )
        out = capsys.readouterr().out
        lines = [line for line in out.splitlines() if line.startswith("dkim_")]
        config.write_text(base + "\n".join(lines) + "\n")
        assert cli.main(["--config", str(config), "check"]) == 0
        handed: list[object] = []
        monkeypatch.setattr(preflight, "main", lambda *args: handed.append(args[3]) or 0)
        assert cli.main(["--config", str(config), "check", "--dns"]) == 0
        signer = load_signer("bcd.test", "s1", root / "dkim" / "bcd.test.s1.key")
        assert handed == [{"bcd.test": [DkimKey("s1", signer.public_key())]}]
        (root / "dkim" / "bcd.test.s1.key").chmod(0o644)
        assert cli.main(["--config", str(config), "check"]) == cli.EX_CONFIG
        assert "readable by root only" in capsys.readouterr().err
        assert cli.main(["--config", str(config), "dkim", "keygen", "bcd.test"]) == cli.EX_DATAERR
    finally:
        shutil.rmtree(root)
