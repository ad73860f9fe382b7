"""The worker end to end: prepare, chroot (when root), serve the spool, stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_delivery import ZONE, Recorder, make_tenant, smtp_server
from test_dnsrelay import DNSStack, dns_stack

from nsmail import worker
from nsmail.config import DeliveryConfig
from nsmail.queuefile import FAILED, INCOMING, Envelope, decode, encode, write_durably

SPOOL = "spool"


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSStack]:
    with dns_stack(ZONE) as stack:
        yield stack


def start_worker(dns: DNSStack, home: Path, port: int, scan_interval: float = 3600) -> int:
    """Fork a worker the way the supervisor does: prepare, then jail (chroot only), run."""
    channel = dns.channel()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            chroot = os.geteuid() == 0
            spool_root = Path("/") / SPOOL if chroot else home / SPOOL
            config = DeliveryConfig(scan_interval=scan_interval, timeout=5, port=port)
            serving = worker.prepare(make_tenant(home), config, channel, spool_root=spool_root)
            if chroot:
                os.chroot(home)
                os.chdir("/")
            serving.run()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_for(condition: Callable[[], object], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def stop(pid: int) -> int:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("worker ignored SIGTERM")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


def spool_files(home: Path, state: str) -> list[str]:
    return sorted(os.listdir(home / SPOOL / state))


def test_worker_delivers_settles_and_stops(dns: DNSStack, home: Path) -> None:
    recorder = Recorder(
        rcpt_replies={"later": "451 4.3.0 try later", "nobody": "550 5.1.1 no such user"}
    )
    with smtp_server(recorder) as port:
        pid = start_worker(dns, home, port)
        try:
            wait_for(lambda: (home / SPOOL / INCOMING).is_dir())
            spool = home / SPOOL
            body = b"Subject: hi\r\n\r\nhello\r\n"
            # Only inotify can wake the worker now: the next scan is an hour away.
            write_durably(
                spool, "m1", encode(Envelope("alice@tenant.test", ("a@rcpt.test",)), body)
            )
            wait_for(lambda: recorder.received and not spool_files(home, INCOMING))
            assert recorder.received[0].recipients == ["a@rcpt.test"]
            assert recorder.received[0].peer == "127.0.0.5"

            write_durably(spool, "m2", b"NSMAIL-QUEUE 1\ntorn")
            wait_for(lambda: spool_files(home, FAILED) == ["m2"])

            mixed = ("b@rcpt.test", "later@rcpt.test", "nobody@rcpt.test")
            write_durably(spool, "m3", encode(Envelope("alice@tenant.test", mixed), body))
            wait_for(lambda: len(recorder.received) == 2)
            wait_for(
                lambda: (
                    decode((spool / INCOMING / "m3").read_bytes())[0].recipients
                    == ("later@rcpt.test",)
                )
            )
            time.sleep(0.2)  # the rewrite must not trigger an immediate retry
            assert recorder.rcpt_attempts.count("later@rcpt.test") == 1

            write_durably(spool, "m4", encode(Envelope("", ("nobody@rcpt.test",)), body))
            wait_for(lambda: spool_files(home, FAILED) == ["m2", "m4"])
            assert spool_files(home, INCOMING) == ["m3"]
        finally:
            status = stop(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_periodic_scan_retries_what_is_left(dns: DNSStack, home: Path) -> None:
    recorder = Recorder(rcpt_replies={"later": "451 4.3.0 try later"})
    spool = home / SPOOL
    for state in ("tmp", INCOMING, FAILED):
        (spool / state).mkdir(parents=True)
    body = b"Subject: hi\r\n\r\nhello\r\n"
    write_durably(spool, "old", encode(Envelope("alice@tenant.test", ("later@rcpt.test",)), body))
    with smtp_server(recorder) as port:
        pid = start_worker(dns, home, port, scan_interval=0.3)
        try:
            wait_for(lambda: recorder.rcpt_attempts.count("later@rcpt.test") >= 2)
            recorder.rcpt_replies.clear()
            wait_for(lambda: not spool_files(home, INCOMING))
        finally:
            status = stop(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert recorder.received[0].recipients == ["later@rcpt.test"]
