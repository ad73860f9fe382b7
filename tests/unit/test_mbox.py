"""The mbox entry of a message (nsmail.core.mbox), as mail(1) and mutt read /var/mail."""

from __future__ import annotations

import mailbox
from datetime import datetime, timedelta, timezone
from pathlib import Path

from nsmail.core.mbox import entry, from_line

WHEN = datetime(2024, 6, 4, 10, 0, 0, tzinfo=timezone(timedelta(hours=2)))


def test_the_from_line_names_the_sender_or_mailer_daemon() -> None:
    assert from_line("root@abc.test", WHEN) == b"From root@abc.test Tue Jun  4 10:00:00 2024\n"
    assert from_line("", WHEN).startswith(b"From MAILER-DAEMON Tue")
    assert from_line('"a b"\n@x', WHEN).startswith(b'From "a_b"_@x Tue')


def test_lines_end_in_lf_and_from_lines_are_quoted_however_the_pieces_are_cut() -> None:
    message = b"Subject: hi\r\n\r\nFrom here on\r\n>From there\r\nno end"
    whole = b"".join(entry("root@abc.test", WHEN, [message]))
    assert whole == (
        b"From root@abc.test Tue Jun  4 10:00:00 2024\n"
        b"Subject: hi\n\n>From here on\n>From there\nno end\n\n"  # mboxo, as Postfix's
    )
    cut = [message[i : i + 3] for i in range(0, len(message), 3)]
    assert b"".join(entry("root@abc.test", WHEN, cut)) == whole


def test_pythons_mbox_reader_reads_two_entries_back(tmp_path: Path) -> None:
    path = tmp_path / "root"
    with path.open("wb") as f:
        for subject in (b"one", b"two"):
            f.writelines(entry("", WHEN, [b"Subject: " + subject + b"\r\n\r\nFrom me\r\n"]))
    box = mailbox.mbox(path)
    messages = list(box)
    box.close()
    assert [m["Subject"] for m in messages] == ["one", "two"]
    assert messages[0].get_payload() == ">From me\n"
