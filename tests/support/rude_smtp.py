"""A rude SMTP receiver for reliability tests: it misbehaves in every way a real one may.

Run as a process inside the lab's "internet" namespace::

    python tests/support/rude_smtp.py --listen 203.0.113.25:25 --listen [2001:db8:113::25]:25 \\
        --log FILE --seed N --mode rude|fair [--stall SECONDS] [--slow SECONDS] \\
        [--tarpit 203.0.113.27:25 ...]

A seed replays the same misbehaviour: connection ``c`` (counted from 0) first draws
its greeting from ``GREETING`` with ``random.Random(f"{seed}:{c}")``, and its ``t``-th
transaction (a client may keep a session for several messages) draws its fate from
``TRANSACTION`` with ``random.Random(f"{seed}:{c}:{t}")``. ``--mode fair`` always greets
and accepts at once. Stalls are silences longer than the client waits (``--stall``); slow
answers come late but within its timeouts (``--slow``: the greeting, the reply to MAIL, the
reply after the dot). ``--tarpit`` listens on more addresses, a second domain's MX that
accepts and never greets (``lab.receivers.serve_tarpit``). Every stored message is one
JSON line in the log (Message-ID, envelope, behaviour, connection and transaction numbers,
time), written, flushed and fsynced *before* the final reply, so the log holds everything
a client may believe was received.
``drop-after-dot`` stores the message and then closes without a reply: the client cannot
know, must retry, and the retry is a duplicate (``"acked": false`` marks such a record).
Each connection and transaction is also one line on stderr, for the story of a failure.

"listening" on stdout says the sockets are bound. `RudeSmtp` starts one in a lab and
reads its log back.

Security: test infrastructure; runs as root inside a lab namespace only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from typing import IO, Any, NoReturn

from lab import MX_V4, MX_V6, Lab
from lab.receivers import Site, serve_tarpit

# name -> weight, drawn once per connection.
GREETING = {
    "greet": 74,
    "slow-greeting": 6,  # greets, --slow seconds late
    "421-greeting": 12,  # RFC 5321 3.8: service not available, closing
    "garbage-greeting": 8,  # a greeting line without a code
}
# name -> weight, drawn once per transaction (at MAIL); "accept" is frequent so that
# most mail settles within a few attempts.
TRANSACTION = {
    "accept": 44,
    "slow-mail": 3,  # the reply to MAIL comes --slow seconds late
    "slow-dot": 6,  # the reply after the dot comes --slow seconds late
    "421-mail": 4,  # shutting down in the middle of a kept session
    "451-rcpt": 6,
    "452-rcpt": 6,  # too many recipients: the first is taken, the rest get 452
    "550-rcpt": 5,
    "552-data": 5,  # after the dot
    "drop-before-data": 6,  # RCPT taken, the connection dies at DATA
    "drop-after-dot": 6,  # stored, then the connection dies before the reply
    "stall": 3,  # no reply to MAIL for longer than the client waits
    "garbage-rcpt": 4,  # "2x0 ok" to RCPT
    "endless-rcpt": 2,  # "250-" continuation lines to RCPT, never the last one
    "long-line-mail": 2,  # a reply to MAIL longer than any client reads
}
# RFC 5321 4.5.3.1.5 allows reply lines of 512 octets; smtplib reads at most 8192.
LONG_LINE = 10_000


def greeting(seed: int, connection: int, mode: str) -> str:
    """How connection `connection` is greeted (pure, so a test can replay it)."""
    if mode == "fair":
        return "greet"
    return _draw(GREETING, f"{seed}:{connection}")


def fate(seed: int, connection: int, transaction: int, mode: str) -> str:
    """What happens to transaction `transaction` of connection `connection` (pure)."""
    if mode == "fair":
        return "accept"
    return _draw(TRANSACTION, f"{seed}:{connection}:{transaction}")


def _draw(weights: dict[str, int], key: str) -> str:
    return random.Random(key).choices(list(weights), weights=list(weights.values()))[0]


@dataclass
class Transaction:
    number: int = -1  # -1 before the first MAIL
    behaviour: str = "accept"
    mail_from: str | None = None
    rcpt_to: list[str] = field(default_factory=list)


class Hangup(Exception):
    """End the connection now, without a reply."""


class Server:
    def __init__(self, log: IO[str], seed: int, mode: str, stall: float, slow: float) -> None:
        self.log = log
        self.seed = seed
        self.mode = mode
        self.stall = stall
        self.slow = slow
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        greet = greeting(self.seed, number, self.mode)
        print(number, writer.get_extra_info("peername"), greet, file=sys.stderr, flush=True)
        session = Session(self, number, greet, reader, writer)
        try:
            await session.run()
        except (Hangup, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def record(self, connection: int, txn: Transaction, data: bytes, acked: bool) -> None:
        message = BytesHeaderParser().parsebytes(data)
        line = {
            "message_id": str(message.get("Message-ID", "")).strip(),
            "mail_from": txn.mail_from,
            "rcpt_to": txn.rcpt_to,
            "connection": connection,
            "transaction": txn.number,
            "behaviour": txn.behaviour,
            "acked": acked,
            "at": time.time(),
        }
        self.log.write(json.dumps(line) + "\n")
        self.log.flush()
        os.fsync(self.log.fileno())


class Session:
    """One connection: a minimal RFC 5321 server with planned misbehaviours."""

    def __init__(
        self,
        server: Server,
        number: int,
        greet: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.number = number
        self.greet = greet
        self.transactions = 0
        self.reader = reader
        self.writer = writer
        self.txn = Transaction()

    async def reply(self, text: str) -> None:
        self.writer.write(text.encode() + b"\r\n")
        await self.writer.drain()

    async def run(self) -> None:
        if self.greet == "421-greeting":
            await self.reply("421 4.3.2 mx.test closing, come back later")
            raise Hangup
        if self.greet == "garbage-greeting":
            await self.reply("hello, this is not an SMTP greeting")
            raise Hangup
        if self.greet == "slow-greeting":
            await asyncio.sleep(self.server.slow)
        await self.reply("220 mx.test ESMTP rude")
        commands: dict[str, Callable[[str], Awaitable[None]]] = {
            "EHLO": self.ehlo,
            "HELO": self.ehlo,
            "MAIL": self.mail,
            "RCPT": self.rcpt,
            "DATA": self.data,
            "RSET": self.rset,
            "NOOP": self.ok,
        }
        while line := await self.reader.readline():
            verb, _, argument = line.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
            if verb.upper() == "QUIT":
                await self.reply("221 2.0.0 bye")
                return
            handler = commands.get(verb.upper())
            if handler is None:
                await self.reply("500 5.5.2 unknown command")
            else:
                await handler(argument)

    async def ok(self, argument: str) -> None:
        await self.reply("250 2.0.0 ok")

    async def ehlo(self, argument: str) -> None:
        await self.reply("250-mx.test\r\n250 8BITMIME")

    async def rset(self, argument: str) -> None:
        self.txn = Transaction()
        await self.reply("250 2.0.0 ok")

    async def mail(self, argument: str) -> None:
        number = self.transactions
        self.transactions += 1
        rude = fate(self.server.seed, self.number, number, self.server.mode)
        print(f"{self.number}.{number}", rude, file=sys.stderr, flush=True)
        if rude == "stall":
            await asyncio.sleep(self.server.stall)
            raise Hangup
        if rude == "421-mail":
            await self.reply("421 4.3.2 mx.test shutting down")
            raise Hangup
        if rude == "long-line-mail":
            await self.reply("250 2.1.0 " + "o" * LONG_LINE)
            raise Hangup
        self.txn = Transaction(number, rude, mail_from=_path(argument))
        if rude == "slow-mail":
            await asyncio.sleep(self.server.slow)
        await self.reply("250 2.1.0 ok")

    async def rcpt(self, argument: str) -> None:
        first = not self.txn.rcpt_to
        replies = {
            "451-rcpt": "451 4.3.0 try again later",
            "452-rcpt": None if first else "452 4.5.3 too many recipients",
            "550-rcpt": "550 5.1.1 no such user",
            "garbage-rcpt": "2x0 ok",
        }
        if self.txn.behaviour == "endless-rcpt":
            await self.endless_reply()
        refusal = replies.get(self.txn.behaviour)
        if refusal is not None:
            await self.reply(refusal)
            return
        self.txn.rcpt_to.append(_path(argument))
        await self.reply("250 2.1.5 ok")

    async def endless_reply(self) -> NoReturn:
        """Continuation lines, each well within the client's timeout, until it hangs up."""
        while True:
            await self.reply("250-2.1.5 still thinking")
            await asyncio.sleep(self.server.stall / 6)

    async def data(self, argument: str) -> None:
        rude = self.txn.behaviour
        if rude == "drop-before-data":
            raise Hangup
        if not self.txn.rcpt_to:
            await self.reply("554 5.5.1 no valid recipients")
            return
        await self.reply("354 go ahead")
        content = await self._read_data()
        if rude == "552-data":
            await self.reply("552 5.3.4 message too big for me")
        elif rude == "drop-after-dot":
            self.server.record(self.number, self.txn, content, acked=False)
            raise Hangup
        else:
            if rude == "slow-dot":
                await asyncio.sleep(self.server.slow)
            self.server.record(self.number, self.txn, content, acked=True)
            await self.reply("250 2.0.0 stored")
        self.txn = Transaction()

    async def _read_data(self) -> bytes:
        lines = []
        while (line := await self.reader.readline()) != b".\r\n":
            if not line:
                raise Hangup
            # RFC 5321 4.5.2: a leading dot was doubled by the client.
            lines.append(line[1:] if line.startswith(b".") else line)
        return b"".join(lines)


class RudeSmtp:
    """This server on the lab MX addresses (port 25, both families), and a tarpit on
    `tarpit`'s if given; stopped with the lab. Slow answers take a third of a stall."""

    def __init__(
        self,
        lab: Lab,
        *,
        seed: int,
        mode: str = "rude",
        stall: float = 5.0,
        tarpit: Site | None = None,
    ) -> None:
        directory = lab.tempdir("rude-smtp")
        self.log_path = directory / "received.jsonl"
        self.trace_path = directory / "trace.txt"  # a line per connection and transaction
        argv = [sys.executable, __file__, "--log", str(self.log_path)]
        argv += ["--listen", f"{MX_V4}:25", "--listen", f"[{MX_V6}]:25"]
        argv += ["--seed", str(seed), "--mode", mode, "--stall", str(stall)]
        argv += ["--slow", str(stall / 3)]
        if tarpit is not None:
            tarpit.add_to(lab)
            argv += [arg for address in tarpit.listen() for arg in ("--tarpit", address)]
        with self.trace_path.open("w") as trace:
            self._proc = lab.popen(lab.net, argv, stdout=subprocess.PIPE, stderr=trace, text=True)
        self._wait_listening(10.0)

    def _wait_listening(self, timeout: float) -> None:
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else ""
        self._proc.stdout.close()
        if line.strip() != "listening":
            raise RuntimeError(f"rude_smtp did not start: {line!r} (exit {self._proc.poll()})")

    def records(self) -> list[dict[str, Any]]:
        """Every stored message so far, in order; each one JSON object."""
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        # A line is complete once it ends in a newline; the last one may be half-written.
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def _path(argument: str) -> str:
    """The address inside "FROM:<...>" or "TO:<...>", parameters ignored."""
    return argument.partition("<")[2].partition(">")[0]


def _listen_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def main(args: argparse.Namespace) -> None:
    with open(args.log, "a") as log:
        server = Server(log, args.seed, args.mode, args.stall, args.slow)
        listeners = [
            await asyncio.start_server(server.serve, host, port)
            for host, port in map(_listen_address, args.listen)
        ]
        listeners += [
            await asyncio.start_server(serve_tarpit, host, port)
            for host, port in map(_listen_address, args.tarpit)
        ]
        print("listening", flush=True)
        await asyncio.gather(*(listener.serve_forever() for listener in listeners))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--listen", action="append", required=True, help="ADDRESS:PORT")
    parser.add_argument("--log", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=("rude", "fair"), default="rude")
    parser.add_argument("--stall", type=float, default=5.0, help="seconds of silence")
    parser.add_argument("--slow", type=float, default=1.0, help="seconds a slow answer takes")
    parser.add_argument("--tarpit", action="append", default=[], help="ADDRESS:PORT")
    asyncio.run(main(parser.parse_args()))
