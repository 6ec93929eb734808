"""Buffer: the bounded FIFO between two stages, moved in chunks rather than items."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

from ingest.exceptions import BufferClosed

T = TypeVar("T")


class Buffer(Generic[T]):
    """A bounded FIFO shared by the stages on either side of it.

    `put_many` waits while the buffer is full and resumes once `resume_at` places are
    free (GenStage's min demand), so a fast producer wakes once per chunk, not per item.
    After `close()`, takers drain what is left and then get an empty list.
    """

    def __init__(self, capacity: int, resume_at: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._resume_at = max(1, min(resume_at, capacity))
        self._items: deque[T] = deque()
        self._takers: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    async def put_many(self, items: Sequence[T]) -> None:
        """Append every item, waiting for room as often as needed."""
        start, total = 0, len(items)
        while start < total:
            if self._closed:
                raise BufferClosed("the buffer is closed: the pipeline is draining")
            free = self.capacity - len(self._items)
            if free <= 0:
                await self._wait(self._putters)
                continue
            end = min(total, start + free)
            self._items.extend(items[start:end] if start or end < total else items)
            start = end
            self._wake_one(self._takers)

    def put_nowait(self, items: Sequence[T]) -> bool:
        """Append every item if they all fit now; False (nothing added) if not."""
        if self._closed:
            raise BufferClosed("the buffer is closed: the pipeline is draining")
        if len(self._items) + len(items) > self.capacity:
            return False
        self._items.extend(items)
        if self._takers:
            self._wake_one(self._takers)
        return True

    async def put(self, item: T) -> None:
        await self.put_many((item,))

    async def wait_items(self, deadline: float | None = None) -> bool:
        """Wait until an item is there; False when the buffer is closed and empty or the
        loop time `deadline` passed first."""
        while not self._items:
            if self._closed:
                return False
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                return False
            await self._wait(self._takers, deadline)
        return True

    def take_nowait(self, max_items: int) -> list[T]:
        """Remove and return up to `max_items` items, oldest first."""
        items = self._items
        count = min(max_items, len(items))
        if count == len(items):
            taken = list(items)
            items.clear()
        else:
            popleft = items.popleft
            taken = [popleft() for _ in range(count)]
        if items:
            self._wake_one(self._takers)
        if self._putters and self.capacity - len(items) >= self._resume_at:
            self._wake_all(self._putters)
        return taken

    async def take(self, max_items: int, deadline: float | None = None) -> list[T]:
        """Wait for items, then take up to `max_items`; [] when closed and empty or on
        `deadline`."""
        if await self.wait_items(deadline):
            return self.take_nowait(max_items)
        return []

    def close(self) -> None:
        """Accept no more items; takers get what is left, then an empty list."""
        self._closed = True
        self._wake_all(self._takers)
        self._wake_all(self._putters)

    async def _wait(
        self, waiters: deque[asyncio.Future[None]], deadline: float | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiters.append(future)
        timer = None if deadline is None else loop.call_at(deadline, _resolve, future)
        try:
            await future
        except asyncio.CancelledError:
            # A wake-up this waiter can no longer use goes to the next one in line.
            if future.done() and not future.cancelled():
                self._wake_one(waiters)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if not future.done():
                future.cancel()
            if future in waiters:
                waiters.remove(future)

    @staticmethod
    def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                return

    @staticmethod
    def _wake_all(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
