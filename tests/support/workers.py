"""A real worker forked as the supervisor forks one (prepare, then the jail: a chroot into
the home when root), serving the loopback tenant's spool, and mail dropped off for it."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import traceback
from pathlib import Path

from dns_servers import DNSStack
from loopback_tenant import make_tenant

from nsmail.core.config import DeliveryConfig
from nsmail.core.queuefile import Envelope, encode
from nsmail.submit import maildrop
from nsmail.tenant import worker
from nsmail.tenant.spool import Spool, new_queue_id

BODY = b"Subject: hi\n\nhello\n"


def start_worker(
    dns: DNSStack, home: Path, port: int, scan_interval: float = 3600, foreign_senders: bool = False
) -> int:
    """Fork a worker the way the supervisor does: prepare, then jail (chroot only), run."""
    channel = dns.channel()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            chroot = os.geteuid() == 0
            inside = Path("/") if chroot else home
            config = DeliveryConfig(scan_interval=scan_interval, timeout=5, port=port)
            tenant = dataclasses.replace(make_tenant(home), foreign_senders=foreign_senders)
            serving = worker.prepare(tenant, config, channel, home=inside, host_name="abc.test")
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


def submit(spool: Spool, recipients: tuple[str, ...], sender: str = "alice@tenant.test") -> str:
    """A message in maildrop/ as nsmail-sendmail leaves one (from alice); its queue id."""
    queue_id = new_queue_id(time.time())
    envelope = Envelope(sender, recipients, arrival=time.time(), submitter="alice")
    # Written as nsmail-sendmail writes it: a worker starting meanwhile may empty tmp/.
    maildrop.drop(str(spool.root), queue_id, [encode(envelope, BODY)], 0o600)
    return queue_id
