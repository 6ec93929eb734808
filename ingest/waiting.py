"""Bounded waits: for the first of several things to happen, and for one step of closing
down (public: the connector, the service and pipelines use them as the engine does)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from structlog.typing import FilteringBoundLogger

# After the drain, closing the producer (sending its last acks, closing its connection)
# gets this long: a broker that does not answer must not eat the grace period a container
# runtime leaves before SIGKILL. Whatever was not acknowledged is redelivered.
CLOSE_TIMEOUT_S = 5.0


async def first_of(*awaitables: Awaitable[Any]) -> None:
    """Return once one of `awaitables` is done; the others are cancelled (the waits made
    for this call: a future given here is cancelled too, so shield what must go on)::

        # Wake up when a window filled, when the stage stopped, or after the poll interval.
        await first_of(wake.wait(), stopped.wait(), asyncio.sleep(poll_interval))

        # Wait for a task without cancelling it when the other comes first.
        await first_of(stop_requested.wait(), asyncio.shield(worker))
    """
    waiters = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def close_within(closing: Awaitable[None], log: FilteringBoundLogger, what: str) -> None:
    """Await one step of closing down for at most CLOSE_TIMEOUT_S; a step that hangs or
    raises is logged and the shutdown goes on (what a broker did not see acknowledged, it
    redelivers)::

        log = structlog.get_logger().bind(pipeline="orders")
        await close_within(producer.close(), log, "producer close")
        await close_within(database.close(), log, "database close")  # runs even so

    A step that timed out logs `"<what> timed out"` (a warning, with the timeout); one
    that raised logs `"<what> raised"` (an error, with the traceback).
    """
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await closing
    except TimeoutError:
        log.warning(f"{what} timed out", timeout=CLOSE_TIMEOUT_S)
    except Exception:
        log.exception(f"{what} raised")
