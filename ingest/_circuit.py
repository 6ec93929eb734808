"""The circuit breaker of a pipeline (its options: `ingest.options.CircuitBreaker`): what it
counts, when it opens and closes, and the timer that half-opens it.

The breaker outlives the pipeline's generations (a restart keeps it open); its timer is a
task of each generation, spawned by the supervisor."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal

import structlog

from ingest.options import CircuitBreaker

logger = structlog.get_logger("ingest.circuit")

CircuitState = Literal["closed", "half-open", "open"]
CIRCUIT_OPEN = "circuit open"  # the reason of the pipeline's hold while open


class Circuit:
    def __init__(
        self,
        pipeline: str,
        options: CircuitBreaker,
        hold: Callable[[], Awaitable[None]],
        release: Callable[[], Awaitable[None]],
    ) -> None:
        self.options = options
        self.state: CircuitState = "closed"
        self.openings = 0  # in a row, without closing between: the delay doubles with each
        self._hold = hold
        self._release = release
        self._log = logger.bind(pipeline=pipeline)
        self._window: deque[tuple[float, int, int]] = deque()  # (when, settled, raised)
        self._settled = 0
        self._raised = 0
        self._successes = 0  # in a row, while half-open
        self._half_open_at = 0.0
        self._opened = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return self.state == "open"

    async def record(self, settled: int, raised: int) -> None:
        """Count what one acknowledgement settled, `raised` of it failed by an exception;
        open or close the circuit as that says (opening holds the pipeline's intake)."""
        if self.state == "open" or not settled:
            return
        now = time.monotonic()
        if self.state == "half-open":
            if raised:
                await self._open(now, f"{raised} of {settled} raised while half-open")
                return
            self._successes += settled
            if self._successes >= self.options.probes:
                self._close()
            return
        self._window.append((now, settled, raised))
        self._settled += settled
        self._raised += raised
        cutoff = now - self.options.window
        while self._window and self._window[0][0] < cutoff:
            _, old_settled, old_raised = self._window.popleft()
            self._settled -= old_settled
            self._raised -= old_raised
        options = self.options
        if self._settled >= options.min_messages and (
            self._raised >= options.failure_ratio * self._settled
        ):
            await self._open(now, f"{self._raised} of {self._settled} raised")

    async def run(self) -> None:
        """Half-open the circuit once its delay has passed; forever (cancelled with the
        generation of the pipeline it belongs to, and started again with the next)."""
        while True:
            if self.state != "open":
                await self._opened.wait()
                self._opened.clear()
                continue
            await asyncio.sleep(max(0.0, self._half_open_at - time.monotonic()))
            self.state = "half-open"
            self._successes = 0
            self._log.warning("circuit half-open: consuming again to try", openings=self.openings)
            await self._release()

    async def _open(self, now: float, why: str) -> None:
        options = self.options
        delay = min(options.open_delay * 2**self.openings, options.max_open_delay)
        self.state = "open"
        self.openings += 1
        self._half_open_at = now + delay
        self._window.clear()
        self._settled = self._raised = 0
        self._log.error(
            "circuit open: a dependency is failing; consuming stops, and what raises "
            "meanwhile is requeued without counting an attempt",
            why=why,
            half_open_in_s=delay,
        )
        self._opened.set()
        await self._hold()

    def _close(self) -> None:
        self.state = "closed"
        self.openings = 0
        self._log.warning("circuit closed: the dependency answers again")
