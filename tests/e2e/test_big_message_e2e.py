"""A 50 MB message end to end, streamed: sendmail, the queue, the worker, a real Postfix.

Neither the submission command nor the worker holds the message whole in memory: the
test measures their peak resident memory (the kernel's `ru_maxrss` for sendmail, VmHWM
for the worker) and asserts it stays far below the message's size, and that Postfix
received the body byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hosting import DUAL, Hosting, TenantSpec, dns_records
from lab import Lab, Nsd, Postfix

SENDMAIL = str(Path(sys.executable).with_name("nsmail-sendmail"))
SIZE = 50 << 20
LINE = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/0123456789ab\n"
# The peak a process may reach above its idle size: far below the message.
ALLOWED_GROWTH = 16 << 20
# Runs a command and prints its peak RSS in KiB. Not measured on a child of pytest itself:
# the kernel's peak for a process includes what it had before exec, a fork of pytest.
PEAK_OF = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def body_lines() -> Iterator[bytes]:
    """SIZE bytes of 77-byte lines, each numbered so nothing can be lost or moved unseen."""
    for n in range(SIZE // len(LINE)):
        yield b"%010d" % n + LINE[10:]


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_a_50_mb_message_streams_through(lab: Lab) -> None:
    Nsd(lab, dns_records((DUAL,)))
    postfix = Postfix(lab)
    hosting = Hosting(lab)
    big = TenantSpec(DUAL.domain, DUAL.ipv4, DUAL.ipv6, f"message_size_limit = {64 << 20}")
    hosting.write_config((big,))
    hosting.start()
    worker = hosting.wait_status(lambda s: s[DUAL.domain]["state"] == "idle")[DUAL.domain]["pid"]
    worker_idle = kib(worker, "VmRSS")

    uid = hosting.uid(DUAL.domain)
    submit = subprocess.Popen(
        [sys.executable, "-c", PEAK_OF, SENDMAIL, "-i", "x@rcpt.test"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        user=uid,
        group=uid,
        extra_groups=[],
        env={"NSMAIL_CONFIG": str(hosting.config_path), "PATH": "/usr/bin:/bin"},
    )
    assert submit.stdin is not None
    digest = hashlib.sha256()
    submit.stdin.write(b"From: alice@bcd.test\nTo: x@rcpt.test\nSubject: big\n\n")
    for line in body_lines():
        digest.update(line)
        submit.stdin.write(line)
    out, complaint = submit.communicate()  # closes stdin: the end of the message
    assert submit.returncode == 0, complaint
    sendmail_peak = int(out)  # KiB

    started = time.monotonic()
    (received,) = postfix.wait_for(1, timeout=120)
    seconds = time.monotonic() - started
    worker_peak = kib(worker, "VmHWM")
    print(
        f"50 MiB message: sendmail peak RSS {sendmail_peak / 1024:.1f} MiB; worker RSS idle "
        f"{worker_idle / 1024:.1f} MiB, peak {worker_peak / 1024:.1f} MiB; "
        f"delivered {seconds:.1f} s after submission"
    )
    assert received["Subject"] == "big"
    payload = received.get_payload(decode=False)
    assert isinstance(payload, str)
    assert hashlib.sha256(payload.encode()).hexdigest() == digest.hexdigest()
    assert sendmail_peak * 1024 < ALLOWED_GROWTH + (32 << 20)  # Python itself is ~15 MiB
    assert (worker_peak - worker_idle) * 1024 < ALLOWED_GROWTH
    assert hosting.stop() == 0


def test_a_message_over_the_tenants_limit_is_refused_at_submission(lab: Lab) -> None:
    Nsd(lab, dns_records((DUAL,)))
    hosting = Hosting(lab)
    hosting.write_config((TenantSpec(DUAL.domain, DUAL.ipv4, None, "message_size_limit = 1000"),))
    uid = hosting.uid(DUAL.domain)
    result = subprocess.run(
        [SENDMAIL, "x@rcpt.test"],
        input=b"Subject: too big\n\n" + b"x" * 2000 + b"\n",
        capture_output=True,
        user=uid,
        group=uid,
        extra_groups=[],
        env={"NSMAIL_CONFIG": str(hosting.config_path), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == os.EX_DATAERR
    assert result.stderr == (
        b"nsmail-sendmail: message too large: the limit is 1000 bytes for this domain\n"
    )
