"""Activity: a pipeline's messages per second over 15 minutes, its batches by trigger and
its last failures, from its events; and the snapshot the live view reads."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ingest import Batcher, Handlers, Message
from ingest.rabbitmq import PUBLISHED_AT_HEADER
from ingest.service.activity import (
    BUSY_WINDOW_S,
    FAILURES_KEPT,
    HISTORY_S,
    LATENCY_WINDOW_S,
    Activity,
    snapshot,
)
from ingest.testing import push_messages
from ingest.text import TEXT_LIMIT
from tests.support import eventually

from .conftest import MakePipeline


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Some(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        if message.data == "bad":
            return message.failed("bad payload")
        return message.put_batcher("b")

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        return messages


async def test_counts_per_second_kept_for_fifteen_minutes(make_pipeline: MakePipeline) -> None:
    pipeline = await make_pipeline(Some(), batchers={"b": Batcher(batch_size=3)})
    clock = Clock()
    activity = Activity(pipeline, clock)
    await (await push_messages(pipeline, ["a", "b", "c", "bad"])).wait()
    clock.now += 1
    rates = activity.rates()
    assert [len(series) for series in rates.values()] == [HISTORY_S] * 3
    assert (rates["received"][-1], rates["successful"][-1], rates["failed"][-1]) == (4, 3, 1)
    assert activity.triggers == {"size": 1}
    [failure] = activity.failures
    assert (failure["reason"], failure["stage"]) == ("bad payload", "processor_0")
    clock.now += HISTORY_S  # a quarter of an hour later: gone from the window
    assert sum(activity.rates()["received"]) == 0


async def test_only_the_last_failures_are_kept(make_pipeline: MakePipeline) -> None:
    pipeline = await make_pipeline(Some())
    activity = Activity(pipeline)
    await (await push_messages(pipeline, ["bad"] * (FAILURES_KEPT + 10))).wait()
    assert len(activity.failures) == FAILURES_KEPT


async def test_the_snapshot_is_json_with_state_topology_and_queues(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(Some(), batchers={"b": Batcher(batch_size=3)})
    activity = Activity(pipeline)
    await pipeline.pause()
    taken = snapshot(
        {"test": activity},
        {"test": lambda: "paused"},
        {"test": 450},
        {
            ("test", "q"): 7,
            ("other", "x"): 1,
        },
    )
    view = json.loads(json.dumps(taken))["pipelines"]["test"]
    assert view["state"] == "running"
    assert (view["ready"], view["not_ready"], view["paused"]) == (False, "paused", True)
    assert (view["prefetch"], view["queues"]) == (450, {"q": 7})
    # The in-memory producer bounds nothing and has no consumers.
    assert (view["close_early_at"], view["consumers_ready"]) == (None, [])
    assert [group["name"] for group in view["topology"]["batchers"]] == ["b"]


class QuotesTheInput(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message.failed(f"unsupported type {message.data!r}")


async def test_the_failures_keep_a_bounded_message_id_and_reason(
    make_pipeline: MakePipeline,
) -> None:
    """A failure quoting a 65,000-character field is kept, and sent in each snapshot, as
    at most TEXT_LIMIT characters; so is a message_id that long (a file's, say)."""
    pipeline = await make_pipeline(QuotesTheInput())
    activity = Activity(pipeline)
    huge = "x" * 65_000
    for message_id in (huge, huge.encode()):
        await (await push_messages(pipeline, [huge], metadata={"message_id": message_id})).wait()
    assert len(activity.failures) == 2
    for failure in activity.failures:
        assert failure["message_id"].startswith("xxx")
        assert failure["reason"].startswith("unsupported type 'xxx")
        assert len(failure["message_id"]) == len(failure["reason"]) == TEXT_LIMIT


async def test_the_snapshot_bounds_why_a_pipeline_is_not_ready(
    make_pipeline: MakePipeline,
) -> None:
    """A failed pipeline says why with its exception's message, which may quote input."""
    activity = Activity(await make_pipeline(Some()))
    why = "failed: handle_batch raised ValueError: " + "x" * 65_000
    view = snapshot({"test": activity}, {"test": lambda: why}, {"test": None}, {})
    not_ready = view["pipelines"]["test"]["not_ready"]
    assert not_ready.startswith("failed: handle_batch raised ValueError: xxx")
    assert len(not_ready) == TEXT_LIMIT


class ByKey(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message.put_batcher("b").put_batch_key(message.data)

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        return messages


async def test_open_batches_say_how_many_how_old_and_the_busiest_keys(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(
        ByKey(), batchers={"b": Batcher(batch_size=10, batch_timeout=60)}
    )
    assert pipeline.open_batches() == {
        "b": {"batches": 0, "messages": 0, "oldest_s": None, "busiest": []}
    }
    await push_messages(pipeline, ["alice", "bob", "alice"])

    async def held() -> bool:
        return pipeline.open_batches()["b"]["messages"] == 3

    await eventually(held, timeout=5)
    summary = pipeline.open_batches()["b"]
    assert summary["batches"] == 2
    assert summary["busiest"] == [["alice", 2], ["bob", 1]]
    assert 0 <= summary["oldest_s"] < 5


async def test_publish_to_ack_latency_percentiles_over_the_last_minute(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(Some(), batchers={"b": Batcher(batch_size=1)})
    clock = Clock()
    activity = Activity(pipeline, clock)
    assert activity.latency() is None  # nothing stamped yet
    now_ms = int(clock.now * 1000)
    for delay_ms in range(1, 101):  # published 1..100 ms before the ack
        stamped = {"headers": {PUBLISHED_AT_HEADER: now_ms - delay_ms}}
        await (await push_messages(pipeline, ["a"], metadata=stamped)).wait()
    for odd in ({"headers": {PUBLISHED_AT_HEADER: "soon"}}, {"headers": None}, {}):
        await (await push_messages(pipeline, ["a"], metadata=odd)).wait()  # not samples
    assert activity.latency() == {
        "p50": 51.0,
        "p90": 90.0,
        "p99": 99.0,
        "max": 100.0,
        "samples": 100,
    }
    clock.now += LATENCY_WINDOW_S + 1
    assert activity.latency() is None  # out of the window


class Slow(Some):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        await asyncio.sleep(0.02)
        return await super().handle_message(processor, message, context)

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.1)
        return messages


async def test_busy_is_the_share_of_the_workers_time_at_work(make_pipeline: MakePipeline) -> None:
    pipeline = await make_pipeline(Slow(), batchers={"b": Batcher(batch_size=1, concurrency=2)})
    clock = Clock()
    activity = Activity(pipeline, clock)
    assert activity.busy() == {"processors": 0.0, "batchers": {"b": 0.0}}
    await (await push_messages(pipeline, ["a"] * 4)).wait()
    busy = activity.busy()
    # Four batches of 0.1 s for two batch processors over a five-second window: about 4 %.
    assert 0.035 <= busy["batchers"]["b"] <= 0.06
    assert 0 < busy["processors"] < busy["batchers"]["b"]  # 4 x 0.02 s of handle_message
    clock.now += BUSY_WINDOW_S
    assert activity.busy() == {"processors": 0.0, "batchers": {"b": 0.0}}
