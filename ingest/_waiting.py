"""Waiting for the first of several things to happen, and no longer for the others."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def first_of(*awaitables: Awaitable[Any]) -> None:
    """Return once one of `awaitables` is done; the others are cancelled (the waits made
    for this call: a future given here is cancelled too, so shield what must go on)."""
    waiters = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
