"""The real `nsmail-sendmail` console script, run as a tenant uid against a temporary
configuration and spool (its pure option parser and checks: tests/unit/test_sendmail_options.py)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sites import SENDMAIL, Site, assert_nothing_queued, sendmail, unused_ids

from nsmail.core.queuefile import Envelope, decode
from nsmail.host.configfile import load
from nsmail.submit import launcher
from nsmail.submit.submission import SUFFIX, cached, profile_of, refresh
from nsmail.tenant.spool import FLUSH_TRIGGER, MAILDROP, STATES, TMP, Spool

EX_USAGE, EX_DATAERR, EX_UNAVAILABLE, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 64, 65, 69, 75, 77, 78


def only_message(site: Site) -> tuple[Envelope, bytes]:
    (path,) = site.queued()
    assert path.stat().st_uid == site.uid and path.stat().st_mode & 0o777 == 0o600
    return decode(path.read_bytes())


def test_submits_as_the_tenant(site: Site) -> None:
    result = sendmail(site, ["-v", "bob@cde.test", "carol", "-F", "Alice"])
    assert result.returncode == 0, result.stderr
    envelope, body = only_message(site)
    assert body == b"Subject: hi\n\nhello\n"
    assert envelope.sender == f"uid{site.uid}@{site.domain}"
    assert envelope.recipients == ("bob@cde.test", f"carol@{site.domain}")
    assert envelope.submitter == f"uid{site.uid}" and envelope.full_name == "Alice"
    assert not envelope.extract and not envelope.cleaned
    assert result.stderr == f"nsmail-sendmail: queued as {site.queued()[0].name}\n"
    assert site.queued(TMP) == []


def test_extract_recipients(site: Site) -> None:
    assert sendmail(site, ["-t", "-i"], b"To: bob@cde.test\n\nhi\n").returncode == 0
    envelope, _ = only_message(site)
    assert envelope.extract and envelope.recipients == ()


@pytest.mark.parametrize(
    "header",
    [b"Subject: no To\n", b"To: undisclosed-recipients:;\nCc: (nobody)\n", b"To:\n"],
)
def test_extract_without_recipients_is_refused(site: Site, header: bytes) -> None:
    refused = sendmail(site, ["-t"], header + b"\nhi\n")
    assert refused.returncode == EX_USAGE
    assert "no recipient addresses found in header" in refused.stderr
    assert_nothing_queued(site)
    # A recipient argument is enough, as with sendmail and Postfix.
    assert sendmail(site, ["-t", "bob@cde.test"], header + b"\nhi\n").returncode == 0


def test_extract_looks_at_the_header_only(site: Site) -> None:
    message = b"Subject: x\n\nTo: bob@cde.test\n"
    assert sendmail(site, ["-t"], message).returncode == EX_USAGE
    assert sendmail(site, ["-t"], b"Subject: x\n To: folded\nBcc: (c)\n bob\n\n").returncode == 0


def test_foreign_sender(site: Site) -> None:
    refused = sendmail(site, ["-f", "alice@cde.test", "bob@cde.test"])
    assert refused.returncode == EX_NOPERM and "alice@cde.test" in refused.stderr
    assert_nothing_queued(site)

    site.write_config(foreign_senders=True)
    assert sendmail(site, ["-falice@cde.test", "bob@cde.test"]).returncode == 0
    assert only_message(site)[0].sender == "alice@cde.test"


def test_own_domain_and_null_sender(site: Site) -> None:
    assert sendmail(site, ["-r", f"list@{site.domain.upper()}", "bob@cde.test"]).returncode == 0
    assert only_message(site)[0].sender == f"list@{site.domain.upper()}"
    shutil.rmtree(site.spool)
    assert sendmail(site, ["-f", "<>", "bob@cde.test"]).returncode == 0
    assert only_message(site)[0].sender == ""


@pytest.mark.parametrize("args", [["-x", "bob@cde.test"], [], ["-i"], ["bob smith@cde.test"]])
def test_usage_errors(site: Site, args: list[str]) -> None:
    assert sendmail(site, args).returncode == EX_USAGE
    assert_nothing_queued(site)


def test_lone_dot_ends_the_message_unless_i(site: Site) -> None:
    message = b"Subject: dots\n\nfirst\n.\nsecond\n"
    assert sendmail(site, ["bob@cde.test"], message).returncode == 0
    assert only_message(site)[1] == b"Subject: dots\n\nfirst\n"
    shutil.rmtree(site.spool)
    assert sendmail(site, ["-oi", "bob@cde.test"], message).returncode == 0
    assert only_message(site)[1] == message


@pytest.mark.parametrize("options", [["-i"], []])
def test_too_large(site: Site, options: list[str]) -> None:
    site.write_config(tenant_extra="message_size_limit = 100000\n")
    result = sendmail(site, [*options, "bob@cde.test"], b"x\n" * 50_001)
    assert result.returncode == EX_DATAERR
    assert "message too large: the limit is 100000 bytes for this domain" in result.stderr
    assert_nothing_queued(site)
    assert sendmail(site, [*options, "bob@cde.test"], b"x\n" * 50_000).returncode == 0


def test_the_default_size_limit_is_25_mib(site: Site) -> None:
    result = sendmail(site, ["-i", "bob@cde.test"], b"x" * ((25 << 20) + 1))
    assert result.returncode == EX_DATAERR and f"limit is {25 << 20} bytes" in result.stderr
    assert_nothing_queued(site)


def test_a_full_queue_refuses_for_now(site: Site) -> None:
    site.write_config(tenant_extra="queue_size_limit = 3000\n")
    for _ in range(3):  # each queue file is about 1 kB: the third goes over the limit
        assert sendmail(site, ["bob@cde.test"], b"x" * 800).returncode == 0
    result = sendmail(site, ["bob@cde.test"], b"x" * 800)
    assert result.returncode == EX_TEMPFAIL
    assert "queue full: " in result.stderr and "over its limit of 3000" in result.stderr
    assert len(site.queued()) == 3
    for path in site.queued()[:2]:  # the worker delivered some: room again
        path.unlink()
    assert sendmail(site, ["bob@cde.test"], b"x" * 800).returncode == 0


def test_list_and_flush(site: Site) -> None:
    assert sendmail(site, ["-bp"]).stdout == "Mail queue is empty\n"
    assert sendmail(site, ["-f", "<>", "bob@cde.test"]).returncode == 0
    listing = sendmail(site, ["-bp"])
    assert listing.returncode == 0
    (path,) = site.queued()
    assert path.name in listing.stdout and "maildrop" in listing.stdout
    assert "<>" in listing.stdout and "bob@cde.test" in listing.stdout
    assert listing.stdout.endswith("in 1 Request.\n")

    assert not (site.spool / FLUSH_TRIGGER).exists()
    assert sendmail(site, ["-q"]).returncode == 0
    assert (site.spool / FLUSH_TRIGGER).stat().st_uid == site.uid


def test_a_caller_outside_every_tenant_sends_as_the_host(site: Site) -> None:
    stranger = next(uid for uid in unused_ids(2) if uid != site.uid)
    # Before the host's worker made its queue, nothing can be queued: try again later.
    early = sendmail(site, ["bob@cde.test"], uid=stranger)
    assert early.returncode == EX_TEMPFAIL, early.stderr
    nsmail = pwd.getpwnam("nsmail")
    site.host_spool.mkdir()
    os.chown(site.host_spool, nsmail.pw_uid, nsmail.pw_gid)
    Spool(site.host_spool).create(public_maildrop=True)  # what the host worker does
    assert sendmail(site, ["-f", "someone@cde.test", "bob@cde.test"], uid=stranger).returncode == (
        EX_NOPERM
    )
    assert sendmail(site, ["bob@cde.test"], uid=stranger).returncode == 0
    (dropped,) = (site.host_spool / MAILDROP).iterdir()
    envelope, _ = decode(dropped.read_bytes())
    assert envelope.sender.endswith("@host.test")
    # Its owner is the kernel's record of who sent it; the host worker reads it.
    assert dropped.stat().st_uid == stranger
    assert dropped.stat().st_mode & 0o777 == 0o644
    assert_nothing_queued(site)


def test_tenant_option_is_for_root(site: Site) -> None:
    refused = sendmail(site, ["--tenant", site.domain, "bob@cde.test"])
    assert refused.returncode == EX_NOPERM
    assert_nothing_queued(site)
    assert sendmail(site, ["--tenant", "nope.test", "bob"], uid=0).returncode == EX_USAGE

    # Root becomes the tenant: a spool it creates is the tenant's, the sender too.
    assert sendmail(site, ["--tenant", site.domain, "bob@cde.test"], uid=0).returncode == 0
    for directory in (site.spool, *(site.spool / s for s in (*STATES, TMP))):
        assert directory.stat().st_uid == site.uid, directory
    envelope, _ = only_message(site)
    assert envelope.sender == f"uid{site.uid}@{site.domain}"
    assert (
        f"uid{site.uid}@{site.domain}"
        in sendmail(site, ["--tenant", site.domain, "-bp"], uid=0).stdout
    )


def test_broken_configuration(site: Site) -> None:
    result = sendmail(site, ["bob@cde.test"], config=site.root / "missing.toml")
    assert result.returncode == EX_CONFIG and "missing.toml" in result.stderr


def test_full_disk_leaves_nothing_behind(site: Site) -> None:
    site.spool.mkdir(parents=True)
    options = f"size=64k,mode=0700,uid={site.uid},gid={site.uid}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", site.spool], check=True)
    try:
        result = sendmail(site, ["-i", "bob@cde.test"], os.urandom(256 << 10))
        assert result.returncode == EX_TEMPFAIL, result.stderr
        assert "No space left on device" in result.stderr
        assert_nothing_queued(site)
        # Once there is room again the same command succeeds.
        assert sendmail(site, ["bob@cde.test"]).returncode == 0
    finally:
        subprocess.run(["umount", site.spool], check=True)


def test_unwritable_state_directory_leaves_nothing_behind(site: Site) -> None:
    assert sendmail(site, ["-q"]).returncode == 0  # creates the spool
    maildrop = site.spool / MAILDROP
    os.chown(maildrop, 0, 0)
    maildrop.chmod(0o755)
    result = sendmail(site, ["bob@cde.test"])
    assert result.returncode == EX_TEMPFAIL and "Permission denied" in result.stderr
    assert_nothing_queued(site)


# --- -bs: SMTP on stdin and stdout ---------------------------------------------------------


@contextlib.contextmanager
def smtp_session(site: Site, *, args: Sequence[str] = ()) -> Iterator[smtplib.SMTP]:
    """`nsmail-sendmail -bs` as the tenant, stdin and stdout one end of a socket pair,
    driven by Python's smtplib from the other; the greeting is read. The command must
    end with status 0 and nothing on stderr."""
    ours, theirs = socket.socketpair()
    with theirs:
        process = subprocess.Popen(
            [str(SENDMAIL), "-bs", *args],
            stdin=theirs,
            stdout=theirs,
            stderr=subprocess.PIPE,
            cwd=site.root,
            env={"NSMAIL_CONFIG": str(site.config), "PATH": "/usr/bin:/bin"},
            user=site.uid,
            group=site.uid,
            extra_groups=[],
        )
    with process:
        client = smtplib.SMTP(local_hostname="client.test", timeout=60)
        client.sock = ours
        try:
            assert client.getreply()[0] == 220
            yield client
        finally:
            client.close()
            _, stderr = process.communicate(timeout=60)
    assert stderr == b"" and process.returncode == 0


def test_bs_takes_several_messages_in_one_session(site: Site) -> None:
    sender = f"alice@{site.domain}"
    with smtp_session(site, args=["-F", "Alice"]) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == str(25 << 20)
        assert all(client.has_extn(x) for x in ("pipelining", "8bitmime", "smtputf8"))
        message = b"Subject: one\r\n\r\n.hidden dot\r\nbody\r\n"
        assert client.sendmail(sender, ["bob@cde.test", "carol"], message) == {}
        (first,) = site.queued()  # on disk before the 250
        client.mail("", ["SMTPUTF8", "BODY=8BITMIME"])
        client.rcpt("jos\u00e9@cde.test")
        code, reply = client.data("Subject: two\r\n\r\ncaf\u00e9\r\n".encode())
        assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as ")
        queue_id = reply.decode().rpartition(" ")[2]
        client.quit()
    assert [p.name for p in site.queued()] == sorted([first.name, queue_id])
    envelope, body = decode(first.read_bytes())
    assert (envelope.sender, envelope.recipients) == (
        sender,
        ("bob@cde.test", f"carol@{site.domain}"),
    )
    assert envelope.submitter == f"uid{site.uid}" and envelope.full_name == "Alice"
    assert not envelope.extract and body == message  # dot-unstuffed: as the client had it
    envelope, body = decode((site.spool / MAILDROP / queue_id).read_bytes())
    assert (envelope.sender, envelope.recipients) == ("", ("jos\u00e9@cde.test",))
    assert body == "Subject: two\r\n\r\ncaf\u00e9\r\n".encode()


def test_bs_refuses_as_a_submission_does(site: Site) -> None:
    site.write_config(tenant_extra="message_size_limit = 1000\n")
    with smtp_session(site) as client:
        client.ehlo()
        code, text = client.mail("ceo@bank.test")
        assert (code, text[:5]) == (553, b"5.7.1") and b"foreign_senders" in text
        code, text = client.docmd("MAIL FROM:<a b>")
        assert (code, text[:5]) == (501, b"5.1.7")
        assert client.mail(f"a@{site.domain}", ["SIZE=5000"])[0] == 552
        assert client.mail(f"a@{site.domain}")[0] == 250
        code, text = client.docmd("RCPT TO:<bad address>")
        assert (code, text[:5]) == (501, b"5.1.3") and b"bad address" in text
        assert client.rcpt("bob@cde.test")[0] == 250
        code, text = client.data(b"x" * 5000)
        assert (code, text[:5]) == (552, b"5.3.4")
        assert site.queued() == []
        assert client.sendmail(f"a@{site.domain}", ["bob@cde.test"], b"small\r\n") == {}
    assert len(site.queued()) == 1


def test_bs_refuses_for_now_when_the_queue_is_full(site: Site) -> None:
    site.write_config(tenant_extra="queue_size_limit = 500\n")
    with smtp_session(site) as client:
        client.ehlo()
        assert client.sendmail(f"a@{site.domain}", ["bob@cde.test"], b"x" * 600) == {}
        code, text = client.mail(f"a@{site.domain}")
        assert (code, text[:5]) == (452, b"4.3.1") and b"queue full" in text
    assert len(site.queued()) == 1


def test_bs_on_a_full_disk_refuses_for_now_and_leaves_nothing(site: Site) -> None:
    site.spool.mkdir(parents=True)
    options = f"size=64k,mode=0700,uid={site.uid},gid={site.uid}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", site.spool], check=True)
    try:
        with smtp_session(site) as client:
            client.ehlo()
            client.mail(f"a@{site.domain}")
            client.rcpt("bob@cde.test")
            code, text = client.data(os.urandom(96 << 10).hex().encode())
            assert (code, text[:5]) == (452, b"4.3.1") and b"No space left" in text
            assert client.noop()[0] == 250  # the session goes on
        assert_nothing_queued(site)
    finally:
        subprocess.run(["umount", site.spool], check=True)


def test_bs_input_ending_inside_a_message_queues_nothing(site: Site) -> None:
    with smtp_session(site) as client:
        assert client.sock is not None
        client.sock.sendall(
            b"EHLO c.test\r\nMAIL FROM:<a@" + site.domain.encode() + b">\r\n"
            b"RCPT TO:<bob@cde.test>\r\nDATA\r\nSubject: cut\r\n\r\nhalf"
        )
        client.sock.shutdown(socket.SHUT_WR)
        replies = b""
        while chunk := client.sock.recv(65536):
            replies += chunk
    assert replies.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert_nothing_queued(site)


def test_bs_cannot_start_without_a_configuration(site: Site) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        result = subprocess.run(
            [str(SENDMAIL), "-bs"],
            stdin=theirs,
            stdout=theirs,
            capture_output=False,
            stderr=subprocess.PIPE,
            env={"NSMAIL_CONFIG": str(site.root / "missing.toml")},
            user=site.uid,
            group=site.uid,
            extra_groups=[],
            timeout=60,
            check=False,
        )
        theirs.close()
        greeting = ours.recv(4096)
    assert result.returncode == EX_CONFIG and b"missing.toml" in result.stderr
    assert greeting.startswith(b"421 4.3.0 ") and b"missing.toml" in greeting
    assert greeting.endswith(b"\r\n") and greeting.count(b"\r\n") == 1


@pytest.mark.parametrize("args", [["-bs", "bob@cde.test"], ["-bs", "-t"], ["-bs", "-f", "a"]])
def test_bs_takes_no_envelope_arguments(site: Site, args: list[str]) -> None:
    assert sendmail(site, args, b"").returncode == EX_USAGE


@pytest.mark.needs("swaks")
def test_swaks_through_bs(site: Site) -> None:
    sender = f"alice@{site.domain}"
    env = {"NSMAIL_CONFIG": str(site.config), "PATH": f"{SENDMAIL.parent}:/usr/bin:/bin"}
    run = {"capture_output": True, "env": env, "user": site.uid, "group": site.uid}
    common = ["swaks", "--pipe", "nsmail-sendmail -bs", "--to", "bob@cde.test", "--pipeline"]
    sent = subprocess.run(
        [*common, "--from", sender, "--body", ".dot\n"],
        **run,  # type: ignore[call-overload]
        extra_groups=[],
        timeout=60,
        check=False,
    )
    assert sent.returncode == 0, sent.stdout
    assert b"<-  250 2.0.0 Ok: queued as" in sent.stdout
    envelope, body = only_message(site)
    assert envelope.sender == sender and envelope.recipients == ("bob@cde.test",)
    assert b"\r\n.dot\r\n" in body
    refused = subprocess.run(
        [*common, "--from", "ceo@bank.test"],
        **run,  # type: ignore[call-overload]
        extra_groups=[],
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0 and b"<** 553 5.7.1 sender ceo@bank.test" in refused.stdout


# --- -bv ------------------------------------------------------------------------------------


def test_bv_says_what_is_deliverable_without_sending(site: Site) -> None:
    site.write_config(tenant_extra='users = ["B1"]\n')
    result = sendmail(site, ["-bv", "bob@cde.test", "b1", f"ZZ@{site.domain}", "x y"], b"")
    assert result.returncode == os.EX_NOUSER
    assert result.stderr == "nsmail-sendmail: 2 of 4 addresses undeliverable\n"
    assert result.stdout.splitlines() == [
        "bob@cde.test... deliverable: mailer smtp, host cde.test",
        "b1... deliverable: mailer local, user B1",
        f"ZZ@{site.domain}... undeliverable: no such user here",
        "x y... undeliverable: bad address x y",
    ]
    assert sendmail(site, ["-bv", "bob@cde.test", "b1"], b"").returncode == 0
    assert sendmail(site, ["-bv", "-f", "ceo@bank.test", "bob"], b"").returncode == EX_NOPERM
    assert sendmail(site, ["-bv"], b"").returncode == EX_USAGE
    assert_nothing_queued(site)


# --- the submission cache beside the configuration ---------------------------------------


def test_the_cache_gives_what_the_configuration_gives(site: Site) -> None:
    site.write_config(tenant_extra='users = ["b1", "b2"]\n')
    assert refresh(str(site.config))
    config = load(site.config)
    (mine,) = config.tenants
    profiles = cached(str(site.config))
    assert profiles is not None and profiles.current
    assert profiles.of_uid(site.uid) == profile_of(mine, config.delivery)
    assert profiles.of_uid(site.uid).users == ("b1", "b2")
    assert profiles.of_domain(site.domain.upper()) == profiles.of_uid(site.uid)
    host = profiles.of_uid(12345)  # a uid outside every tenant: the host's own mail
    assert host.is_host and host.queue_size_limit == 0
    assert profiles.of_domain("host.test") is None  # --tenant names tenants only


def test_a_current_cache_spares_reading_the_configuration(site: Site) -> None:
    assert refresh(str(site.config))
    site.config.chmod(0o600)  # the tenant can no longer read it, only the cache
    assert sendmail(site, ["bob@cde.test"]).returncode == 0
    (path,) = site.queued()
    assert decode(path.read_bytes())[0].sender.endswith(f"@{site.domain}")


# What a submission may import beyond the interpreter's own start: nsmail's lean modules
# and modules built into the interpreter or frozen in it. A start is mostly imports; one
# more module such as dataclasses, pathlib or contextlib costs as much as the rest of
# the submission.
LEAN_IMPORTS = {
    *("nsmail", "nsmail.submit", "nsmail.core"),  # packages: a docstring each
    "nsmail.submit.sendmail",
    "nsmail.submit.submission",
    "nsmail.submit.maildrop",
    *("nsmail.core.layout", "nsmail.core.addresses", "nsmail.core.text", "nsmail.core.exitcodes"),
    "nsmail.core.queueframe",
    *("__future__", "_collections_abc", "_sha256", "_stat", "genericpath", "marshal"),
    *("os", "os.path", "posixpath", "pwd", "stat"),
}


def _imported(argv: list[str], uid: int, **run: object) -> set[str]:
    """The modules Python imports to run `argv` (its `-X importtime` report) as `uid`."""
    result = subprocess.run(
        [sys.executable, "-IS", "-X", "importtime", *argv],
        capture_output=True,
        user=uid,
        group=uid,
        extra_groups=[],
        check=False,
        timeout=60,
        **run,  # type: ignore[call-overload]
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.decode().splitlines()
    return {line.rpartition("|")[2].strip() for line in lines if line.startswith("import time:")}


def test_the_launcher_starts_python_isolated_without_site(tmp_path: Path) -> None:
    path = tmp_path / "sendmail"
    assert launcher.main([str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o755
    assert path.read_text().startswith(f"#!{sys.executable} -IS\n")
    # -I: the caller's environment cannot put its own modules in the way.
    env = {"PYTHONPATH": str(tmp_path), "NSMAIL_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "nsmail").mkdir()
    (tmp_path / "nsmail" / "__init__.py").write_text("raise SystemExit('hijacked')")
    result = subprocess.run([path, "-bp"], capture_output=True, env=env, check=False)
    assert result.returncode == EX_CONFIG and b"none.toml" in result.stderr, result.stderr
    assert launcher.main([str(tmp_path / "missing" / "dir")]) == os.EX_CANTCREAT


def test_a_submission_imports_only_lean_modules(site: Site) -> None:
    assert refresh(str(site.config))
    started = _imported(["-c", "pass"], site.uid)
    env = {"NSMAIL_CONFIG": str(site.config), "PATH": "/usr/bin:/bin"}
    submission = [str(SENDMAIL), "-i", "-f", f"a@{site.domain}", "bob@cde.test"]
    imported = _imported(submission, site.uid, input=b"Subject: hi\n\nhello\n", env=env)
    assert len(site.queued()) == 1
    assert imported - started - {"imported package"} <= LEAN_IMPORTS


@pytest.mark.parametrize("spoil", ["cache writable by others", "garbage in the cache"])
def test_an_unsafe_cache_is_not_used(site: Site, spoil: str) -> None:
    assert refresh(str(site.config))
    if spoil == "cache writable by others":
        Path(f"{site.config}{SUFFIX}").chmod(0o666)
    else:
        Path(f"{site.config}{SUFFIX}").write_bytes(b"\xfb\x00 not marshal data")
    site.config.chmod(0o600)
    result = sendmail(site, ["bob@cde.test"])  # back to the configuration, unreadable
    assert result.returncode == EX_CONFIG and "Permission denied" in result.stderr
    assert_nothing_queued(site)


def test_a_changed_valid_configuration_wins_over_the_cache(site: Site) -> None:
    assert refresh(str(site.config))
    site.write_config(tenant_extra="message_size_limit = 10\n")
    result = sendmail(site, ["bob@cde.test"])
    assert result.returncode == EX_DATAERR and "limit is 10 bytes" in result.stderr


def write_dropin(site: Site, name: str, text: str) -> Path:
    dropins = site.root / "tenants.d"
    dropins.mkdir(mode=0o755, exist_ok=True)
    path = dropins / name
    path.write_text(text)
    path.chmod(0o644)
    return path


BROKEN_DROPIN = '[[tenant]]\ndomain = "zzz.test"\nipv4 = "300.1.2.3"\nuid = 45999\n'


@pytest.mark.parametrize(
    "breakage",
    [
        "another tenant's drop-in",
        "the caller's own tenant table",
        "the configuration unreadable",
    ],
)
def test_a_broken_configuration_leaves_the_last_good_cache_serving(
    site: Site, breakage: str
) -> None:
    site.write_config(tenant_extra="message_size_limit = 100000\n")
    assert refresh(str(site.config))
    if breakage == "another tenant's drop-in":
        write_dropin(site, "zzz.toml", BROKEN_DROPIN)
    elif breakage == "the caller's own tenant table":
        site.write_config(tenant_extra="message_size_limit = 100\nipv4_typo = 1\n")
    else:
        site.write_config(tenant_extra="message_size_limit = 100\n")
        site.config.chmod(0o600)
    cache = cached(str(site.config))
    assert cache is not None and not cache.current
    # The last good profile, its limit of 100000 included, with nothing on stderr.
    result = sendmail(site, ["bob@cde.test"], b"x" * 5000)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert only_message(site)[0].sender.endswith(f"@{site.domain}")
    too_big = sendmail(site, ["bob@cde.test"], b"x" * 100_001)
    assert too_big.returncode == EX_DATAERR and "limit is 100000 bytes" in too_big.stderr
    assert sendmail(site, ["-bp"]).returncode == 0
    assert sendmail(site, ["--tenant", site.domain, "bob@cde.test"], uid=0).returncode == 0
    if breakage != "the configuration unreadable":  # to the tenant only: root reads it
        # Root's refreshes keep the last good cache: it is never replaced by a broken one.
        assert not refresh(str(site.config))
        assert cached(str(site.config)) is not None


def test_without_a_cache_a_broken_dropin_is_shown_to_root_only(site: Site) -> None:
    write_dropin(site, "zzz.toml", BROKEN_DROPIN)
    refused = sendmail(site, ["bob@cde.test"])
    assert refused.returncode == EX_CONFIG
    assert "zzz" not in refused.stderr and "300.1.2.3" not in refused.stderr
    assert f"{site.config} is not a valid configuration" in refused.stderr
    assert "nsmail check" in refused.stderr
    assert_nothing_queued(site)
    as_root = sendmail(site, ["--tenant", site.domain, "bob@cde.test"], uid=0)
    assert as_root.returncode == EX_CONFIG and "zzz.toml: tenant[0].ipv4" in as_root.stderr


def test_nsmail_check_refuses_a_broken_dropin(site: Site) -> None:
    write_dropin(site, "zzz.toml", BROKEN_DROPIN)
    result = subprocess.run(
        [str(SENDMAIL.with_name("nsmail")), "--config", str(site.config), "check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == EX_CONFIG
    assert "zzz.toml: tenant[0].ipv4" in result.stderr and result.stderr.count("\n") == 1
