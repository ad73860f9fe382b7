"""systemd integration: sd_notify (ready, status) and log lines the journal understands.

With `[log] format = "json"` every line is one JSON object: a delivery event
(`nsmail.core.events`) as its own object, any other line as its time, level, logger and
message, so a log shipper reads the journal or a file of them without a parser of ours.

Security: runs as root; only writes to the socket systemd named in $NOTIFY_SOCKET.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping
from datetime import UTC, datetime

from nsmail.core import events

# sd-daemon(3): a "<N>" prefix on a stderr line sets its syslog priority in the journal.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """Lines without a time stamp (the journal adds its own) but with a priority."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: a delivery event as `events.encode` writes it, anything
    else as {time, level, logger, message}; with the journal's priority prefix under it."""

    def __init__(self, *, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event", None)
        if isinstance(event, events.Event):
            line = events.encode(event)
        else:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + self.formatException(record.exc_info)
            when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            line = json.dumps(
                {
                    "time": when,
                    "level": record.levelname.lower(),
                    "logger": record.name,
                    "message": message,
                }
            )
        return f"<{_PRIORITY.get(record.levelno, 6)}>{line}" if self.journal else line


def log_formatter(environ: Mapping[str, str], log_format: str = "text") -> logging.Formatter:
    """The journal's format under systemd, else time-stamped lines for a terminal or file;
    with `log_format` "json", JSON objects in either place."""
    journal = "JOURNAL_STREAM" in environ
    if log_format == "json":
        return JsonFormatter(journal=journal)
    if journal:
        return JournalFormatter("%(name)s: %(message)s")
    return logging.Formatter("%(asctime)s %(name)s: %(message)s")


def notify(**fields: str) -> bool:
    """Send `KEY=value` lines to systemd; False (and nothing sent) when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract socket
        address = "\0" + address[1:]
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            # Never wait: a listener that stopped reading must not freeze the supervisor
            # (reaping, restarts) once its small queue is full; the next STATUS= says it all.
            sock.sendto(message, socket.MSG_DONTWAIT, address)
        except OSError:
            return False
    return True
