"""Reconnect delays computed from a Backoff option."""

from __future__ import annotations

import random

from ingest.rabbitmq.options import Backoff


def reconnect_delay(
    backoff: Backoff, attempt: int, rng: random.Random | None = None
) -> float | None:
    """Seconds to wait before reconnect attempt `attempt` (1-based); None means give up."""
    rng = rng or random.Random()
    if backoff.type == "stop":
        return None
    if backoff.type == "rand":
        return rng.uniform(backoff.min, backoff.max)
    ceiling = float(min(backoff.max, backoff.min * 2 ** min(attempt - 1, 32)))
    if backoff.type == "exp":
        return ceiling
    return rng.uniform(backoff.min, ceiling)  # rand_exp
