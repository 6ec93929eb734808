"""The service's garbage collector settings: what start-up left is frozen, and a reference
cycle made afterwards is still collected without anyone calling `gc.collect()`."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from ingest.service import garbage


@pytest.fixture
def settled() -> Iterator[None]:
    thresholds = gc.get_threshold()
    garbage.settle()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_what_lives_at_start_up_is_frozen(settled: None) -> None:
    assert gc.get_freeze_count() > 1000
    assert gc.get_threshold() == garbage.THRESHOLDS


def test_a_cycle_made_afterwards_is_collected_by_the_young_generation(settled: None) -> None:
    first, second = Node(), Node()
    first.other, second.other = second, first
    collected = weakref.finalize(first, lambda: None)
    del first, second
    assert collected.alive  # only the collector can free a cycle
    kept = [[] for _ in range(garbage.THRESHOLDS[0] + 1)]  # allocations that trigger it
    assert not collected.alive
    assert len(kept) > garbage.THRESHOLDS[0]


async def test_a_cycle_among_frozen_objects_is_collected_once_refrozen(settled: None) -> None:
    first, second = Node(), Node()
    first.other, second.other = second, first
    collected = weakref.finalize(first, lambda: None)
    garbage.settle()  # frozen while alive, as a connection made at start-up
    del first, second
    gc.collect()
    assert collected.alive  # frozen: the collector does not look at it
    async with garbage.kept_settled(interval=0.01):
        await asyncio.sleep(0.1)
    assert not collected.alive
