"""Work in flight shared by key: whoever asks while it runs waits for the same task.

Security: runs as the tenant inside its namespace and chroot; holds only its own tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")


class InFlight(Generic[Key, Value]):
    """One task per key while it runs; forgotten when it ends, so the next ask starts anew."""

    def __init__(self) -> None:
        self._running: dict[Key, asyncio.Task[Value]] = {}

    async def get(self, key: Key, start: Callable[[], Coroutine[Any, Any, Value]]) -> Value:
        """The result of the task for `key`, started with `start()` if none runs."""
        task = self._running.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(start())
            self._running[key] = task
            task.add_done_callback(lambda done: self._ended(key, done))
        # Shielded: one caller cut off must not cancel the work the others wait for.
        return await asyncio.shield(task)

    def _ended(self, key: Key, task: asyncio.Task[Value]) -> None:
        del self._running[key]
        if not task.cancelled():
            task.exception()  # seen, even if every caller was cut off
