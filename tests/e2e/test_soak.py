"""The soak test, short: 300 messages from three tenants through the real sendmail into a
rude receiver (and a tarpit, for one in twenty), with two worker kills, one supervisor
kill and one graceful supervisor restart; nothing lost, nothing stuck.

`scripts/soak` runs the full one (10,000 messages, 10 tenants). The seed is printed;
NSMAIL_SOAK_SEED replays it.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import asdict

from soak import Options, soak, table

SHORT = Options(
    tenants=3,
    messages=300,
    worker_kills=2,
    supervisor_kills=1,
    restarts=1,
    submitters=4,
    settle=60.0,
    lifetime=20.0,  # the tarpit's mail bounces within the settling
)


def test_short_soak_loses_nothing() -> None:
    seed = int(os.environ.get("NSMAIL_SOAK_SEED") or secrets.randbelow(1 << 30))
    print(f"seed {seed}")
    figures = soak(Options(**{**asdict(SHORT), "seed": seed}), print)
    print(table(figures))
    assert figures.messages == SHORT.messages
    assert figures.lost == 0
    assert figures.worker_kills == SHORT.worker_kills
    assert figures.supervisor_kills == SHORT.supervisor_kills
    assert figures.restarts == SHORT.restarts
    assert not figures.problems, table(figures)
