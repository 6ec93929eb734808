"""RateLimiter: a pipeline-wide allowance of messages per interval, changeable at run time."""

from __future__ import annotations

import asyncio
import contextlib

from ingest.options import RateLimiting


class RateLimiter:
    """Hands out permits to the processors: `allowed_messages` per window of `interval`.

    Like Broadway's, the allowance is refilled whole at the start of each window (not a
    sliding bucket); permits taken but not used are given back.
    """

    def __init__(self, limits: RateLimiting) -> None:
        self._limits = limits
        self._remaining = limits.allowed_messages
        self._window_ends: float | None = None
        self._changed = asyncio.Event()

    @property
    def limits(self) -> RateLimiting:
        return self._limits

    def update(self, limits: RateLimiting) -> None:
        """Apply new limits at once: a new window starts with the new allowance (unlike
        Broadway, which keeps the current window), and waiters re-check now."""
        self._limits = limits
        self._window_ends = None
        self._changed.set()
        self._changed = asyncio.Event()

    async def acquire(self, wanted: int) -> int:
        """Wait until at least one permit is free; take up to `wanted` of them."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if self._window_ends is None or now >= self._window_ends:
                self._window_ends = now + self._limits.interval
                self._remaining = self._limits.allowed_messages
            if self._remaining > 0:
                granted = min(wanted, self._remaining)
                self._remaining -= granted
                return granted
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._window_ends - now)

    def release(self, unused: int) -> None:
        """Give back permits that were acquired but not used."""
        if unused > 0:
            self._remaining = min(self._remaining + unused, self._limits.allowed_messages)
