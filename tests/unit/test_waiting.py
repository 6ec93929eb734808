"""first_of: returns with the first thing done, and no longer waits for the others."""

from __future__ import annotations

import asyncio

from ingest._waiting import first_of


async def test_the_first_done_ends_the_wait_and_the_others_are_cancelled() -> None:
    quick, never = asyncio.Event(), asyncio.Event()
    slow = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.01, quick.set)
    await asyncio.wait_for(first_of(quick.wait(), never.wait(), slow), timeout=2)
    assert quick.is_set()
    await asyncio.sleep(0)
    assert slow.cancelled()  # a future given is cancelled too


async def test_a_shielded_task_goes_on() -> None:
    work = asyncio.create_task(asyncio.sleep(0.05, "done"))
    await first_of(asyncio.sleep(0), asyncio.shield(work))
    assert await work == "done"
