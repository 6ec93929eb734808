"""The garbage collector of a long-running service, set once its pipelines run.

What a service holds for its whole life (modules, SQLAlchemy's tables and compiled
statements, pydantic's validators, the pipelines' stages: about 97,000 objects the
collector tracks) is frozen: CPython's collector skips it from then on. What it makes per
message is freed by reference counting as soon as the message is acknowledged, so the
youngest generation is collected every 10,000 allocations rather than 700, which leaves
little to find and still catches reference cycles (an exception's traceback, say) within
milliseconds of work. Frozen objects that become garbage later (a connection replaced
after the broker went away, a restarted pipeline's stages) are only freed by reference
counting: those in a reference cycle wait for `kept_settled`, which thaws, collects and
freezes again every REFREEZE_INTERVAL_S seconds while the service runs.

Measured with `bench/service.py` on a drain of 100,000 messages through three batchers
into a database (one process, the collector timed through `gc.callbacks`, its `gc_s`
column; docs/PERFORMANCE.md, issue 23): the collections took
0.6-1.5 s of a 10-14 s drain with CPython's defaults, the 9-11 full ones each walking
those 97,000 objects, and 0.04-0.13 s set as here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator

# CPython's defaults are (700, 10, 10).
THRESHOLDS = (10_000, 10, 10)
# A full collection of the thawed objects: 25 ms for the ~90,000 of the service's imports
# (measured with its modules imported, this project's 2-core machine).
REFREEZE_INTERVAL_S = 600.0


def settle() -> None:
    """Collect what start-up left behind, freeze what survived, and collect the young
    generation less often. Called once the pipelines run (`ingest run`, each worker of
    `--workers N`); calling it again freezes what was made since."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


@contextlib.asynccontextmanager
async def kept_settled(interval: float = REFREEZE_INTERVAL_S) -> AsyncIterator[None]:
    """While in the block, every `interval` seconds: thaw what was frozen, collect it all
    (what became cyclic garbage among it too), freeze again. The task is this block's
    own: cancelled and awaited when the block ends."""
    task = asyncio.create_task(_refreeze_every(interval), name="garbage collector")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _refreeze_every(interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        gc.unfreeze()
        settle()
