"""The circuit breaker of a pipeline (its options: `ingest.options.CircuitBreaker`): what it
counts, when it opens, probes and closes, how many messages it lets in meanwhile, how what
fails while it is not closed goes back, and the timer that half-opens it.

The breaker outlives the pipeline's generations (a restart keeps it open); its timer is a
task of each generation, spawned by the supervisor."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, Literal

import structlog

from ingest.message import Failed, Message
from ingest.options import CircuitBreaker

logger = structlog.get_logger("ingest.circuit")

CircuitState = Literal["closed", "half-open", "open"]
CIRCUIT_OPEN = "circuit open"  # the reason of the pipeline's hold while open

# How a message that raised while the circuit was open or probing goes back: the first of
# these actions its acknowledger takes. `release` counts nothing against the message (the
# RabbitMQ producer's: a copy at the tail of the queue, its attempt count unchanged, and the
# delivery acknowledged, so that a quorum queue counts no delivery either);
# `reject_and_requeue` counts no retry attempt (a quorum queue counts the delivery).
HAND_BACK: Final = ("release", "reject_and_requeue")


class Circuit:
    """Closed, it lets every message in and counts how they settle. Open, it lets none in:
    the pipeline holds its intake and finishes what it has. Half-open, it lets in
    `probes` messages (and asks the producer to take no more than that at once, when it
    can: `ingest.producer.LimitingProducer`); the others wait where they are. The probes
    succeeding close it; one raising opens it again. Whatever raises while it is open or
    probing goes back without counting an attempt (`HAND_BACK`): the dependency failed,
    not the message, and an outage of any length must not use up a message's attempts.
    """

    def __init__(
        self,
        pipeline: str,
        options: CircuitBreaker,
        hold: Callable[[], Awaitable[None]],
        release: Callable[[], Awaitable[None]],
        limit: Callable[[int | None], Awaitable[None]],
    ) -> None:
        self.options = options
        self.state: CircuitState = "closed"
        self.openings = 0  # in a row, without closing between: the delay doubles with each
        self._hold = hold
        self._release = release
        self._limit = limit
        self._log = logger.bind(pipeline=pipeline)
        self._window: deque[tuple[float, int, int]] = deque()  # (when, settled, raised)
        self._settled = 0
        self._raised = 0
        self._successes = 0  # in a row, while half-open
        self._admitted = 0  # messages let in while half-open
        self._half_open_at = 0.0
        self._opened = asyncio.Event()
        # Set, and replaced by a new one, at each change of state: see `changed`.
        self._changed = asyncio.Event()

    def room(self) -> int | None:
        """How many more messages may enter the pipeline now: any number (None) while
        closed, none while open, what is left of the probes while half-open."""
        if self.state == "closed":
            return None
        if self.state == "open":
            return 0
        return max(0, self.options.probes - self._admitted)

    def admit(self, count: int) -> None:
        """`count` messages entered the pipeline (within `room()`)."""
        if self.state == "half-open":
            self._admitted += count

    def changed(self) -> asyncio.Event:
        """An event set at the next change of state (taken now: a change between a look at
        `room()` and the wait is not missed)."""
        return self._changed

    async def count(self, successful: list[Message], failed: list[Message]) -> None:
        """Record what one acknowledgement settles. What raised while the circuit was not
        closed goes back without counting an attempt (`HAND_BACK`); what raised while it
        was closed counts one, as any failure does, those that open it included."""
        raised = [m for m in failed if isinstance(m.status, Failed) and m.status.exception]
        was_closed = self.state == "closed"
        await self.record(len(successful) + len(failed), len(raised))
        if not was_closed:
            for message in raised:
                hand_back(message)

    async def record(self, settled: int, raised: int) -> None:
        """Count what one acknowledgement settled, `raised` of it failed by an exception;
        open or close the circuit as that says (opening holds the pipeline's intake)."""
        if self.state == "open" or not settled:
            return
        now = time.monotonic()
        if self.state == "half-open":
            if raised:
                await self._open(now, f"{raised} of {settled} raised while probing")
                return
            self._successes += settled
            if self._successes >= self.options.probes:
                await self._close()
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
            # The producer takes messages in again, no more than the probes at once, and
            # only then are they let in: a probe failing at once opens the circuit again
            # after the release, never before it (the hold would be lost).
            await self._limit(self.options.probes)
            await self._release()
            self._successes = self._admitted = 0
            self._set_state("half-open")
            self._log.warning(
                "circuit half-open: probing with a few messages",
                probes=self.options.probes,
                openings=self.openings,
            )

    async def _open(self, now: float, why: str) -> None:
        options = self.options
        delay = min(options.open_delay * 2**self.openings, options.max_open_delay)
        self.openings += 1
        self._half_open_at = now + delay
        self._window.clear()
        self._settled = self._raised = 0
        self._set_state("open")
        self._log.error(
            "circuit open: a dependency is failing; consuming stops, and what raises "
            "meanwhile goes back without counting an attempt",
            why=why,
            half_open_in_s=delay,
        )
        self._opened.set()
        await self._hold()

    async def _close(self) -> None:
        self.openings = 0
        self._set_state("closed")
        self._log.warning("circuit closed: the dependency answers again")
        await self._limit(None)

    def _set_state(self, state: CircuitState) -> None:
        self.state = state
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def hand_back(message: Message) -> None:
    """Make a failed message go back to its producer without counting an attempt: the
    first of `HAND_BACK` its acknowledger takes; one that takes neither (a file has no
    requeue) keeps the message's own action."""
    for action in HAND_BACK:
        try:
            message.configure_ack(on_failure=action)
        except ValueError:
            continue
        return
