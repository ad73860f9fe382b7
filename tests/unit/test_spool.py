"""The spool: durable puts, one-rename moves, recovery after a crash, quarantine safety."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nsmail.core.message import chunks
from nsmail.core.queuefile import TRAILER_BYTES, Envelope, QueueFileError, frame
from nsmail.submit import maildrop
from nsmail.tenant.spool import (
    ACTIVE,
    DEFERRED,
    INCOMING,
    MAILDROP,
    STATES,
    TMP,
    Spool,
    new_queue_id,
)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.create()
    return spool


def test_put_lands_in_one_state_only(spool: Spool) -> None:
    spool.put(MAILDROP, "q1", [b"data"])
    assert spool.ids(MAILDROP) == ["q1"]
    assert all(spool.ids(state) == [] for state in STATES if state != MAILDROP)
    assert os.listdir(spool.root / TMP) == []
    spool.put(MAILDROP, "q1", [b"newer"])  # replaces, atomically
    assert (spool.root / MAILDROP / "q1").read_bytes() == b"newer"


def test_move_and_schedule(spool: Spool) -> None:
    spool.put(INCOMING, "q1", [b"data"])
    spool.schedule("q1", INCOMING, 1_000_000.0)
    spool.move("q1", INCOMING, DEFERRED)
    assert spool.next_attempt("q1", float("inf")) == 1_000_000.0  # a rename keeps the time
    assert spool.next_attempt("gone", float("inf")) is None


def test_a_next_attempt_never_lies_past_the_bound(spool: Spool) -> None:
    """The tenant owns the file and sets its mtime at will: a date far ahead counts as
    the bound, never further; one far in the past stands (it is simply due)."""
    spool.put(DEFERRED, "ahead", [b"data"])
    spool.schedule("ahead", DEFERRED, 4e9)
    spool.put(DEFERRED, "past", [b"data"])
    spool.schedule("past", DEFERRED, -1e9)
    assert spool.next_attempt("ahead", 2e9) == 2e9
    assert spool.next_attempt("past", 2e9) == -1e9


def test_recovery_returns_active_mail_and_drops_unacknowledged_temp_files(spool: Spool) -> None:
    spool.put(ACTIVE, "crashed", [b"data"])
    (spool.root / TMP / "half").write_bytes(b"never acknowledged")
    assert spool.recover() == ["crashed"]
    assert spool.ids(INCOMING) == ["crashed"] and spool.ids(ACTIVE) == []
    assert os.listdir(spool.root / TMP) == []


def test_hostile_names_and_symlinks(spool: Spool, tmp_path: Path) -> None:
    (spool.root / INCOMING / ".hidden").write_bytes(b"x")
    (spool.root / INCOMING / "link").symlink_to(tmp_path / "secret")
    (tmp_path / "secret").write_bytes(b"host file")
    assert spool.ids(INCOMING) == ["link"]
    # A directory is no submission (see test_idle_e2e for the host's public maildrop);
    # one elsewhere is listed, to be quarantined.
    for state in (MAILDROP, INCOMING):
        (spool.root / state / "folder").mkdir()
    (spool.root / MAILDROP / "dirlink").symlink_to(tmp_path)  # listed, never followed
    assert spool.ids(MAILDROP) == ["dirlink"]
    assert spool.ids(INCOMING) == ["folder", "link"]
    with pytest.raises(OSError), spool.open_message(INCOMING, "link"):
        pass
    with pytest.raises(ValueError):
        spool.put(INCOMING, "../escape", [b"x"])


def test_flush_trigger_is_taken_once(spool: Spool) -> None:
    assert not spool.take_flush_request()
    spool.request_flush()
    assert spool.take_flush_request()
    assert not spool.take_flush_request()


def test_queue_ids_sort_by_time_and_are_unique() -> None:
    assert new_queue_id(1.0) < new_queue_id(2.0) < new_queue_id(3.5)
    assert len({new_queue_id(2.0) for _ in range(100)}) == 100


@pytest.mark.parametrize("size", [100, 3 << 20])  # read whole, and streamed from the file
def test_open_message_checks_and_gives_the_body(tmp_path: Path, size: int) -> None:
    spool = Spool(tmp_path)
    spool.create()
    envelope = Envelope("a@tenant.test", ("b@rcpt.test",))
    body = os.urandom(size)
    spool.put(INCOMING, "q1", frame(envelope, [body[: size // 2], body[size // 2 :]]))
    with spool.open_message(INCOMING, "q1") as (found, stored, mtime):
        assert found == envelope and stored.length == size
        assert b"".join(chunks(stored)) == body
        assert mtime == spool.path(INCOMING, "q1").stat().st_mtime
    path = spool.path(INCOMING, "q1")
    data = bytearray(path.read_bytes())
    data[-TRAILER_BYTES - size // 2] ^= 1  # inside the body
    path.write_bytes(bytes(data))
    with pytest.raises(QueueFileError, match="checksum"), spool.open_message(INCOMING, "q1"):
        pass


def test_open_message_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.create()
    os.mkfifo(spool.path(INCOMING, "fifo"))
    spool.path(INCOMING, "link").symlink_to("/etc/passwd")
    with pytest.raises(OSError, match="not a regular file"), spool.open_message(INCOMING, "fifo"):
        pass
    with pytest.raises(OSError) as caught, spool.open_message(INCOMING, "link"):
        pass
    assert caught.value.errno == errno.ELOOP


def test_size_counts_every_state(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.create()
    spool.put(INCOMING, "a", [b"x" * 100])
    spool.put(DEFERRED, "b", [b"y" * 50])
    assert maildrop.size(str(tmp_path)) == 150
