"""`nsmail status`: the table's figures, and the command against a real control socket.

The socket is served by `nsmail.root.control` and `nsmail.root.serving` themselves with a fixed
reply, so the command's own handling (one tenant, no such tenant) is seen without starting
a supervisor.
"""

from __future__ import annotations

import dataclasses
import selectors
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hosting import NSMAIL

from nsmail.core.status import WorkerStatus, render_table
from nsmail.root import control, serving

BCD = WorkerStatus(
    domain="bcd.test",
    role="tenant",
    namespace="nsm-bcd.test",
    pid=4242,
    uid=61000,
    state="idle",
    ipv4="198.51.100.70",
    ipv6=None,
    restarts=0,
    started=0.0,
    queue={"maildrop": 0, "incoming": 0, "active": 0, "deferred": 3, "hold": 2, "corrupt": 1},
    total={"sent": 5, "deferred": 3, "bounced": 0},
    hour={"sent": 5, "deferred": 3, "bounced": 0},
    last_error=None,
    last_error_at=None,
    last_delivery_at=None,
    refused_reports=0,
    latency_counts=None,
    latency_sum=None,
)


def test_held_and_quarantined_mail_are_told_apart() -> None:
    # Held mail waits for an operator's release; a quarantined file will never be sent.
    (_, row, _, kept) = render_table([BCD], now=60.0).splitlines()
    assert row.split()[-1] == "3"  # queued: deferred, neither held nor quarantined
    assert kept == "  2 held, 1 quarantined (corrupt/)"
    nothing_kept = dataclasses.replace(BCD, queue={**(BCD.queue or {}), "hold": 0, "corrupt": 0})
    assert "held" not in render_table([nothing_kept], now=60.0)
    assert "quarantined" not in render_table([nothing_kept], now=60.0)


@pytest.fixture
def config() -> Iterator[Path]:
    """A configuration whose run_dir has a control socket answering `status`."""
    with tempfile.TemporaryDirectory(prefix="nsmail-status-") as directory:
        root = Path(directory)
        path = root / "nsmail.toml"
        path.write_text(f'[host]\nname = "abc.test"\nrun_dir = "{root}/run"\n')
        selector = selectors.DefaultSelector()
        reply = {"ok": True, "host": "abc.test", "workers": [BCD.to_json()]}
        server = serving.Server(
            control.listen(root / "run", None),
            selector,
            lambda peer, request: control.respond(peer, request, lambda _: reply, None),
            control.TERMINATOR,
            control.MAX_REQUEST,
        )
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                for key, _ in selector.select(0.05):
                    key.data()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            yield path
        finally:
            stop.set()
            thread.join()
            server.close()


def status(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NSMAIL, "--config", str(config), "status", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_one_tenant(config: Path) -> None:
    shown = status(config, "BCD.test")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[1].startswith("bcd.test ")


@pytest.mark.parametrize("as_json", [(), ("--json",)])
def test_no_such_tenant_is_one_line_and_a_usage_error(config: Path, as_json: tuple[str]) -> None:
    # Like `nsmail flush` and `nsmail queue --tenant`: 64, not an empty table and 0.
    result = status(config, "nosuch.test", *as_json)
    assert (result.returncode, result.stdout) == (64, "")
    assert result.stderr == "nsmail: no such tenant: nosuch.test\n"
