"""The lifecycle shared by the lab's servers: serve in a background thread, or in the foreground.

A lab server opens its listening sockets in an asyncio event loop and registers their
closing on an exit stack; this module runs that loop either in a thread (``start``/``stop``,
for tests and the demo's own process) or as the whole process until SIGTERM or SIGINT
(``serve_forever``, for a server started inside a lab network namespace).

Security: test and demo infrastructure only; runs as whoever starts it (root in the demo)
and binds only the addresses it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future

Endpoint = tuple[str, int]


def parse_endpoint(text: str) -> Endpoint:
    """``ADDR:PORT`` (``[ADDR]:PORT`` or bare ``ADDR:PORT`` for IPv6) as an (address, port) pair."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not ADDR:PORT")
    host = host.removeprefix("[").removesuffix("]")
    return str(ipaddress.ip_address(host)), int(port)


class LabServer(ABC):
    """A server whose sockets `_open` creates inside a running event loop."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._stop_soon: Callable[[], object] = lambda: None

    @abstractmethod
    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        """Bind and serve every address, registering each socket's closing on `stack`."""

    def start(self) -> None:
        """Serve in a background thread; raises here if an address cannot be bound."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        opened: Future[Callable[[], object]] = Future()
        thread = threading.Thread(
            target=asyncio.run,
            args=(self._in_thread(opened),),
            name=type(self).__name__,
            daemon=True,
        )
        thread.start()
        try:
            self._stop_soon = opened.result()
        except BaseException:
            thread.join()
            raise
        self._thread = thread

    def stop(self) -> None:
        """Close every socket and end the background thread (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop_soon()
            thread.join()

    def serve_forever(self, ready: Callable[[], object] = lambda: None) -> None:
        """Serve until SIGTERM or SIGINT, calling `ready` once every address is bound."""
        asyncio.run(self._in_foreground(ready))

    async def _in_thread(self, opened: Future[Callable[[], object]]) -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        stop_soon = functools.partial(loop.call_soon_threadsafe, stopping.set)
        try:
            await self._serve(stopping, lambda: opened.set_result(stop_soon))
        except Exception as error:
            # Reported to start(), which raises it in the caller's thread.
            if opened.done():
                raise
            opened.set_exception(error)

    async def _in_foreground(self, ready: Callable[[], object]) -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        await self._serve(stopping, ready)

    async def _serve(self, stopping: asyncio.Event, opened: Callable[[], object]) -> None:
        async with contextlib.AsyncExitStack() as stack:
            await self._open(stack)
            opened()
            await stopping.wait()
