"""first_of: returns with the first thing done, and no longer waits for the others;
close_within: gives a closing step up after CLOSE_TIMEOUT_S."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from structlog.testing import capture_logs

from ingest import waiting
from ingest.waiting import close_within, first_of


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


async def test_a_closing_step_that_hangs_is_given_up_after_the_close_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(waiting, "CLOSE_TIMEOUT_S", 0.05)
    with capture_logs() as logs:
        await asyncio.wait_for(
            close_within(asyncio.Event().wait(), structlog.get_logger("test"), "channel close"), 2
        )
    assert [(line["event"], line["log_level"]) for line in logs] == [
        ("channel close timed out", "warning")
    ]
