"""The garbage collector of a long-running service, set once its pipelines run.

What a service holds for its whole life (modules, SQLAlchemy's tables and compiled
statements, pydantic's validators, the pipelines' stages: about 97,000 objects the
collector tracks) is frozen: CPython's collector skips it from then on. What it makes per
message is freed by reference counting as soon as the message is acknowledged, so the
youngest generation is collected every 10,000 allocations rather than 700, which leaves
little to find and still catches reference cycles (an exception's traceback, say) within
milliseconds of work.

Measured with `bench/service.py` on a bookings drain (100,000 bookings, one process, the
collector timed through `gc.callbacks`, its `gc_s` column): the collections took
0.6-1.5 s of a 10-14 s drain with CPython's defaults, the 9-11 full ones each walking
those 97,000 objects, and 0.04-0.09 s set as here (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import gc

# CPython's defaults are (700, 10, 10).
THRESHOLDS = (10_000, 10, 10)


def settle() -> None:
    """Collect what start-up left behind, freeze what survived, and collect the young
    generation less often. Called once the pipelines run (`ingest run`, each worker of
    `--workers N`); calling it again freezes what was made since."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
