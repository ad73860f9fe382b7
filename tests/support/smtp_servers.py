"""SMTP servers for the loopback tests: aiosmtpd on loopback with a handler that records
every message it takes and answers each recipient as told."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller


@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes
    peer: str
    ehlo: str
    tls: bool
    session: int  # which SMTP session (connection) carried it


@dataclass
class Recorder:
    """An aiosmtpd handler recording messages; replies per recipient from `rcpt_replies`."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str = "250 2.0.0 accepted"
    received: list[Received] = field(default_factory=list)
    rcpt_attempts: list[str] = field(default_factory=list)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.rcpt_attempts.append(address)
        reply = self.rcpt_replies.get(address.split("@")[0])
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(
            Received(
                sender=envelope.mail_from,
                recipients=list(envelope.rcpt_tos),
                content=envelope.original_content,
                peer=session.peer[0],
                ehlo=session.host_name,
                tls=session.ssl is not None,
                session=id(session),
            )
        )
        return self.data_reply


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def smtp_server(
    recorder: Recorder, host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> Iterator[int]:
    """An aiosmtpd server on `host`; yields its port."""
    controller = Controller(recorder, hostname=host, port=port or free_port(), **kwargs)
    controller.start()
    try:
        yield controller.port
    finally:
        controller.stop()
