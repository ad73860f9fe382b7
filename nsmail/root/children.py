"""The zygote's start, the prelude it loads, and the entry points of its children.

`nsmail supervise` forks the zygote (`nsmail.root.spawn`) before it imports the supervisor,
which brings netlink, the listeners and the rest of the root's modules; the zygote's
prelude meanwhile loads, on the other core, the worker's and the DNS relay's modules and
what every worker shares (`worker.preload`). Neither process loads what only the other
runs: the supervisor names these entry points by this light module alone, and the zygote
never imports the supervisor.

Security: runs as root. Each entry point runs in a child of the zygote, as root in the
child's network namespace and before its jail (`spawn.Target`); what it is given comes
from the supervisor's validated configuration, never from a tenant.
"""

from __future__ import annotations

import resource
import socket
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from nsmail.root.spawn import Zygote

if TYPE_CHECKING:
    from nsmail.core.config import DeliveryConfig, IPAddress, SmtpdConfig, Tenant


def start_zygote() -> tuple[Zygote, int]:
    """Raise the soft limit on open files to the hard one, then start the zygote with
    `prelude`; the zygote, and the soft limit as it was (the one workers keep).

    The supervisor holds five descriptors per running worker (its ends of the worker's
    DNS, report and hand-off channels, both ends of its SMTP session channel) and one per
    tenant asleep (its watch), and the DNS relay, which inherits the limit through the
    zygote, one per running worker: systemd's default soft limit of 1024 would run out
    near 200 tenants.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    zygote = Zygote(prelude)
    zygote.start()
    return zygote, soft


def prelude() -> None:
    """Load, in the zygote, what its children run and what every worker may share."""
    from nsmail.host import dnsrelay  # noqa: F401 (loaded to be shared, not used here)
    from nsmail.tenant import worker

    worker.preload()


def worker_main(
    tenant: Tenant,
    delivery: DeliveryConfig,
    host_name: str,
    tenant_uids: frozenset[int] | None,
    taken: tuple[int, float],
    open_files: int,
    smtpd: SmtpdConfig,
    suspended: bool,
    fds: list[int],
) -> Callable[[], None]:
    """A tenant's worker (the host's own when `tenant_uids`, the uids it must refuse)."""
    from nsmail.tenant import worker

    # A worker needs a few dozen descriptors: it keeps the limit the supervisor started
    # with, hard too (it has no CAP_SYS_RESOURCE to raise it), so that a compromised one
    # cannot hold as many as the supervisor may.
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    dns, reports, handoffs, sessions = (socket.socket(fileno=fd) for fd in fds)
    handoffs.setblocking(False)
    return worker.prepare(
        tenant,
        delivery,
        dns,
        reports,
        host_queue=None if tenant_uids is None else worker.HostQueue(tenant_uids),
        taken=taken,
        host_name=host_name,
        handoffs=handoffs,
        sessions=sessions,
        smtpd_config=smtpd,
        suspended=suspended,
    ).run


def relay_main(
    resolvers: tuple[IPAddress, ...], timeout: float, fds: list[int]
) -> Callable[[], None]:
    """The DNS relay."""
    from nsmail.host import dnsrelay

    return partial(dnsrelay.run, socket.socket(fileno=fds[0]), resolvers, timeout)
