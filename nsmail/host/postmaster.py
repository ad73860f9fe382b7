"""The postmaster's drop: a tenant's mail for the host's postmaster, put into the host's queue.

A tenant's worker, jailed in its home, cannot reach the host's queue; its mail for
postmaster@<host name> (a double bounce above all: a bounce that found no one to take it)
is handed over (`nsmail.core.handoff`) and this child, forked by the zygote for each one
and jailed into the host's queue as `host.user`, drops it there as `nsmail-sendmail`
would: with the null sender, so that it can never bounce back, and the host's postmaster
as its recipient. The host's worker then delivers it as the host's aliases say.

Security: runs jailed (nsmail.root.jail) as `host.user` in the host's queue. The message
is tenant-written and only copied, at most `limit` bytes (the file's size when it came);
the host's worker treats it as it treats every submission.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

from nsmail.core.queuefile import Envelope, frame
from nsmail.host import handoffchild
from nsmail.submit import maildrop


def child(host_name: str, limit: int, fds: list[int]) -> Callable[[], None]:
    """The zygote's target: called with the message and the answer socket, before the jail."""
    content, answer = fds
    return partial(handoffchild.run, partial(_drop_now, host_name, limit), content, answer)


def _drop_now(host_name: str, limit: int, content: int) -> str:
    return drop(host_name, limit, content, time.time())


def drop(host_name: str, limit: int, content: int, now: float) -> str:
    """Queue the message in `content` for the postmaster of `host_name` in the queue of
    the working directory; the answer, an RFC 3463 status and words. `limit`: 0 for none."""
    queue_id = maildrop.new_queue_id(now)
    envelope = Envelope("", (f"postmaster@{host_name}",), arrival=now, submitter="MAILER-DAEMON")
    try:
        size = handoffchild.size_of(content)
        if limit and size > limit:
            return f"5.3.4 over the {limit} bytes the host's postmaster takes"
        message = handoffchild.pieces(content, size)
        maildrop.drop(".", queue_id, frame(envelope, message), 0o600)
    except OSError as e:
        return f"4.3.0 the host's queue: {e.strerror or e}"
    return f"2.0.0 queued for the postmaster of {host_name} as {queue_id}"
