"""Buffer: the bounded FIFO between stages."""

from __future__ import annotations

import asyncio

import pytest

from ingest._buffer import Buffer, BufferClosed


async def test_put_many_waits_while_the_buffer_is_full() -> None:
    buffer = Buffer[int](capacity=3, resume_at=2)
    putter = asyncio.create_task(buffer.put_many(range(5)))
    await asyncio.sleep(0)
    assert len(buffer) == 3
    assert not putter.done()
    assert buffer.take_nowait(1) == [0]
    await asyncio.sleep(0)
    assert not putter.done()  # one free place is less than resume_at
    assert buffer.take_nowait(1) == [1]
    await putter
    assert buffer.take_nowait(10) == [2, 3, 4]


async def test_take_returns_empty_once_closed_and_drained() -> None:
    buffer = Buffer[int](capacity=4)
    await buffer.put_many([1, 2])
    buffer.close()
    assert await buffer.take(10) == [1, 2]
    assert await buffer.take(10) == []
    with pytest.raises(BufferClosed):
        await buffer.put(3)


async def test_take_with_a_deadline_returns_empty_when_it_passes() -> None:
    buffer = Buffer[int](capacity=4)
    loop = asyncio.get_running_loop()
    assert await buffer.take(1, deadline=loop.time() + 0.01) == []


async def test_a_cancelled_taker_passes_its_wake_up_on() -> None:
    buffer = Buffer[int](capacity=4)
    first = asyncio.create_task(buffer.take(1))
    second = asyncio.create_task(buffer.take(1))
    await asyncio.sleep(0)
    await buffer.put(1)
    first.cancel()
    assert await asyncio.wait_for(second, 1) == [1]
