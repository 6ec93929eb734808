"""Durable windows in the engine, on the in-memory window store: the window clock, messages
acknowledged once stored, windows closed by size and time and claimed once, retries,
dead letters, a store that is down."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pytest

from ingest import Batcher, BatchInfo, CircuitBreaker, Handlers, Message, Processors
from ingest.events import Event
from ingest.producer import PipelineShape
from ingest.stores import MemoryWindowStore
from ingest.testing import push_messages, send_batch
from ingest.windows import DurableWindows, StoredMessage, WindowRule

from .conftest import MakePipeline


class DeadLetters:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.fail_with: BaseException | None = None

    async def dead_letter(self, messages: Sequence[Message]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.messages.extend(messages)


class Digests(Handlers):
    """Routes `key:payload` to the `email` batcher under `key`; records each batch. Fails
    the first `failures` calls of handle_batch; fails `bad` payloads on purpose."""

    def __init__(self, failures: int = 0) -> None:
        self.batches: list[tuple[BatchInfo, list[Any], list[dict[str, Any]]]] = []
        self.failures = failures
        self.handled_failed: list[Message] = []
        self.seen = asyncio.Event()

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        key, _, payload = str(message.data).partition(":")
        return message.put_data({"payload": payload}).put_batcher("email").put_batch_key(key)

    async def handle_batch(
        self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
    ) -> list[Message]:
        self.batches.append(
            (batch_info, [m.data["payload"] for m in messages], [m.metadata for m in messages])
        )
        self.seen.set()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("mail server down")
        for message in messages:
            if message.data["payload"] == "bad":
                message.failed("no such recipient")
        return messages

    async def handle_failed(self, messages: list[Message], context: Any) -> list[Message]:
        self.handled_failed.extend(messages)
        return messages

    def payloads(self) -> list[list[Any]]:
        return [payloads for _, payloads, _ in self.batches]


def durable(
    store: MemoryWindowStore,
    dead: DeadLetters | None = None,
    *,
    size: int = 75,
    timeout: float = 60.0,
    **options: Any,
) -> dict[str, Batcher]:
    options.setdefault("poll_interval", 0.02)
    options.setdefault("delays", (0.05,))
    windows = DurableWindows(store, dead or DeadLetters(), **options)
    return {"email": Batcher(batch_size=size, batch_timeout=timeout, windows=windows)}


async def eventually(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - a condition of the pipeline's stages
            await asyncio.sleep(0.01)


# -- the window clock --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "age", "due"),
    [(0, 100.0, False), (1, 9.99, False), (1, 10.0, True), (74, 0.0, False), (75, 0.0, True)],
    ids=["empty", "young", "timed-out", "nearly-full", "full"],
)
def test_a_window_is_due_when_full_or_timed_out(count: int, age: float, due: bool) -> None:
    rule = WindowRule(size=75, timeout=10.0)
    assert rule.is_due(count, opened_at=1000.0, now=1000.0 + age) is due


def test_a_window_says_why_it_closed() -> None:
    rule = WindowRule(size=75, timeout=10.0)
    assert (rule.trigger(75), rule.trigger(3), rule.due_at(5.0)) == ("size", "timeout", 15.0)


@pytest.mark.parametrize(
    "options",
    [{"size": 0, "timeout": 1.0}, {"size": 1, "timeout": 0}, {"size": True, "timeout": 1.0}],
    ids=["size-0", "timeout-0", "size-bool"],
)
def test_a_window_rule_refuses_what_cannot_work(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="window"):
        WindowRule(**options)


async def test_the_store_closes_the_oldest_messages_of_a_key_and_opens_the_next_window() -> None:
    store = MemoryWindowStore()
    rule = WindowRule(size=3, timeout=10.0)
    first = [StoredMessage("k", f'"{i}"', "{}", f"m{i}") for i in range(4)]
    assert await store.append("b", first[:2], rule, now=100.0) == 0
    assert await store.append("b", first[2:], rule, now=105.0) == 1
    assert await store.close_due("b", rule, now=105.0, limit=10) == 1
    (window,) = store.closed_windows("b")
    assert ([m.message_id for m in window.messages], window.trigger) == (["m0", "m1", "m2"], "size")
    # The message left over opened the next window when it arrived: due at 115.
    assert await store.close_due("b", rule, now=114.9, limit=10) == 0
    assert await store.close_due("b", rule, now=115.0, limit=10) == 1


async def test_a_claimed_window_is_not_claimed_again_until_released() -> None:
    store = MemoryWindowStore()
    rule = WindowRule(size=1, timeout=10.0)
    await store.append("b", [StoredMessage("k", "1", "{}", "m")], rule, now=0.0)
    await store.close_due("b", rule, now=0.0, limit=10)
    async with (
        store.claim("b", now=1.0, limit=10) as first,
        store.claim("b", now=1.0, limit=10) as second,
    ):
        assert (len(first.windows), len(second.windows)) == (1, 0)
    # Released without an outcome: claimable again, the same window.
    async with store.claim("b", now=1.0, limit=10) as again:
        assert [w.id for w in again.windows] == [w.id for w in first.windows]


# -- the durable batcher -----------------------------------------------------------------


async def test_messages_are_acknowledged_once_stored_before_their_window_closes(
    make_pipeline: MakePipeline,
) -> None:
    store, handlers = MemoryWindowStore(), Digests()
    pipeline = await make_pipeline(handlers, batchers=durable(store, timeout=60.0))
    result = await send_batch(pipeline, [f"ann:{i}" for i in range(10)])
    assert (len(result.successful), result.failed) == (10, [])
    assert handlers.batches == []
    view = await store.open_windows("email")
    assert (view.windows, view.messages) == (1, 10)


async def test_a_full_window_is_handled_with_its_data_metadata_and_window_id(
    make_pipeline: MakePipeline,
) -> None:
    store, handlers = MemoryWindowStore(), Digests()
    pipeline = await make_pipeline(handlers, batchers=durable(store, size=3))
    await send_batch(pipeline, ["ann:1", "ann:2", "ann:3"], metadata={"headers": {"h": b"v"}})
    await eventually(lambda: handlers.batches)
    info, payloads, metadata = handlers.batches[0]
    assert (info.batcher, info.batch_key, info.size, info.trigger) == ("email", "ann", 3, "size")
    assert info.window is not None
    assert payloads == ["1", "2", "3"]
    assert metadata[0] == {"headers": {"h": "v"}}  # bytes come back as text
    await eventually(lambda: not store.closed_windows("email"))


async def test_a_window_closes_batch_timeout_after_its_first_message(
    make_pipeline: MakePipeline,
) -> None:
    store, handlers = MemoryWindowStore(), Digests()
    pipeline = await make_pipeline(handlers, batchers=durable(store, timeout=0.2))
    started = asyncio.get_running_loop().time()
    await send_batch(pipeline, ["ann:1", "bob:1", "ann:2"])
    await eventually(lambda: len(handlers.batches) == 2)
    assert asyncio.get_running_loop().time() - started >= 0.2
    assert sorted((info.batch_key, info.trigger, info.size) for info, _, _ in handlers.batches) == [
        ("ann", "timeout", 2),
        ("bob", "timeout", 1),
    ]


async def test_a_window_is_bounded_by_size_not_by_what_arrived_at_once(
    make_pipeline: MakePipeline,
) -> None:
    store, handlers = MemoryWindowStore(), Digests()
    pipeline = await make_pipeline(handlers, batchers=durable(store, size=4, timeout=0.2))
    await send_batch(pipeline, [f"ann:{i}" for i in range(10)])
    await eventually(lambda: sum(len(p) for p in handlers.payloads()) == 10)
    assert sorted(len(p) for p in handlers.payloads()) == [2, 4, 4]
    assert [p for batch in handlers.payloads() for p in batch] == [str(i) for i in range(10)]


async def test_a_redelivered_message_joins_no_second_window(make_pipeline: MakePipeline) -> None:
    store, handlers = MemoryWindowStore(), Digests()
    pipeline = await make_pipeline(handlers, batchers=durable(store, timeout=0.1))
    await send_batch(pipeline, ["ann:1"], metadata={"message_id": "m-1"})
    await send_batch(pipeline, ["ann:1"], metadata={"message_id": "m-1"})
    await eventually(lambda: handlers.batches)
    await asyncio.sleep(0.2)
    assert handlers.payloads() == [["1"]]


async def test_a_failing_window_is_retried_whole_with_the_same_id(
    make_pipeline: MakePipeline,
) -> None:
    store, dead, handlers = MemoryWindowStore(), DeadLetters(), Digests(failures=2)
    pipeline = await make_pipeline(handlers, batchers=durable(store, dead, size=2))
    await send_batch(pipeline, ["ann:1", "ann:2"])
    await eventually(lambda: len(handlers.batches) == 3)
    await eventually(lambda: not store.closed_windows("email"))
    assert len({info.window for info, _, _ in handlers.batches}) == 1
    assert handlers.payloads() == [["1", "2"]] * 3
    assert dead.messages == []


async def test_a_window_failing_past_its_attempts_goes_to_the_dead_letters_with_the_reason(
    make_pipeline: MakePipeline,
) -> None:
    store, dead, handlers = MemoryWindowStore(), DeadLetters(), Digests(failures=10)
    pipeline = await make_pipeline(handlers, batchers=durable(store, dead, size=2, max_attempts=3))
    await send_batch(pipeline, ["ann:1", "ann:2"])
    await eventually(lambda: len(dead.messages) == 2)
    assert len(handlers.batches) == 3
    assert {m.failure_reason for m in dead.messages} == {
        "handle_batch raised ConnectionError: mail server down"
    }
    assert [m.data for m in handlers.handled_failed] == [{"payload": "1"}, {"payload": "2"}]
    await eventually(lambda: not store.closed_windows("email"))


async def test_a_dead_lettered_message_replayed_joins_a_window_again(
    make_pipeline: MakePipeline,
) -> None:
    store, dead, handlers = MemoryWindowStore(), DeadLetters(), Digests()
    pipeline = await make_pipeline(handlers, batchers=durable(store, dead, size=1))
    await send_batch(pipeline, ["ann:bad"], metadata={"message_id": "m-1"})
    await eventually(lambda: dead.messages)
    await send_batch(pipeline, ["ann:bad"], metadata={"message_id": "m-1"})  # the replay
    await eventually(lambda: len(handlers.batches) == 2)


async def test_a_message_failed_on_purpose_is_dead_lettered_at_once_and_the_rest_done(
    make_pipeline: MakePipeline,
) -> None:
    store, dead, handlers = MemoryWindowStore(), DeadLetters(), Digests()
    pipeline = await make_pipeline(handlers, batchers=durable(store, dead, size=2))
    await send_batch(pipeline, ["ann:bad", "ann:ok"])
    await eventually(lambda: dead.messages)
    assert [(m.data, m.failure_reason) for m in dead.messages] == [
        ({"payload": "bad"}, "no such recipient")
    ]
    assert len(handlers.batches) == 1
    await eventually(lambda: not store.closed_windows("email"))


async def test_a_dead_letter_sink_that_fails_keeps_the_window(
    make_pipeline: MakePipeline,
) -> None:
    store, dead, handlers = MemoryWindowStore(), DeadLetters(), Digests()
    dead.fail_with = ConnectionError("broker down")
    pipeline = await make_pipeline(handlers, batchers=durable(store, dead, size=1))
    await send_batch(pipeline, ["ann:bad"])
    await eventually(lambda: len(handlers.batches) >= 2)
    assert dead.messages == []
    assert len(store.closed_windows("email")) == 1
    dead.fail_with = None
    await eventually(lambda: dead.messages)
    await eventually(lambda: not store.closed_windows("email"))


async def test_nothing_is_acknowledged_as_done_while_the_store_is_down(
    make_pipeline: MakePipeline,
) -> None:
    store, handlers = MemoryWindowStore(), Digests()
    events: list[Event] = []
    pipeline = await make_pipeline(handlers, batchers=durable(store))
    pipeline.events.subscribe(events.append, kinds={"window.exception"})
    store.fail_with = ConnectionError("database gone")
    result = await send_batch(pipeline, ["ann:1", "ann:2"])
    assert (result.successful, len(result.failed)) == ([], 2)
    assert (
        result.failed_reasons == ["window store append raised ConnectionError: database gone"] * 2
    )
    assert "append" in [event.reason for event in events]
    store.fail_with = None
    result = await send_batch(pipeline, ["ann:3"])
    assert len(result.successful) == 1


async def test_an_open_circuit_holds_the_intake_while_the_store_is_down(
    make_pipeline: MakePipeline,
) -> None:
    store = MemoryWindowStore()
    breaker = CircuitBreaker(min_messages=4, open_delay=60.0)
    pipeline = await make_pipeline(Digests(), batchers=durable(store), circuit_breaker=breaker)
    store.fail_with = ConnectionError("database gone")
    await send_batch(pipeline, [f"ann:{i}" for i in range(4)])
    await eventually(lambda: pipeline.circuit_state == "open")
    assert "circuit open" in pipeline.holds


@pytest.mark.parametrize(
    ("unstorable", "reason"),
    [
        ({1, 2}, "Type is not JSON serializable: set"),
        # What would not come back as it went is refused too, not turned into text.
        ({"at": datetime(2026, 12, 4)}, "Type is not JSON serializable: datetime.datetime"),
        ({1: "one"}, "Dict key must be str"),
    ],
    ids=["set", "date", "integer key"],
)
async def test_data_that_cannot_be_stored_fails_that_message_only(
    make_pipeline: MakePipeline, unstorable: Any, reason: str
) -> None:
    class Unstorable(Digests):
        async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
            message = await super().handle_message(processor, message, context)
            if message.data["payload"] == "bad":
                message.data = unstorable
            return message

    store = MemoryWindowStore()
    pipeline = await make_pipeline(Unstorable(), batchers=durable(store))
    result = await send_batch(pipeline, ["ann:bad", "ann:ok"])
    assert len(result.successful) == 1
    assert result.failed_reasons == [f"storing the data as JSON raised TypeError: {reason}"]


async def test_two_pipelines_on_one_store_handle_each_window_once(
    make_pipeline: MakePipeline,
) -> None:
    store, first, second = MemoryWindowStore(), Digests(), Digests()
    a = await make_pipeline(first, batchers=durable(store, size=5, timeout=0.1))
    b = await make_pipeline(second, batchers=durable(store, size=5, timeout=0.1))
    keys = [f"user{i}" for i in range(20)]
    await asyncio.gather(
        send_batch(a, [f"{k}:a{i}" for i in range(7) for k in keys]),
        send_batch(b, [f"{k}:b{i}" for i in range(7) for k in keys]),
    )
    await eventually(lambda: sum(len(p) for h in (first, second) for p in h.payloads()) == 280)
    windows = [info.window for h in (first, second) for info, _, _ in h.batches]
    assert len(windows) == len(set(windows))
    assert first.batches, "the first pipeline flushed nothing"
    assert second.batches, "the second pipeline flushed nothing"


async def test_stored_windows_outlive_the_pipeline_and_are_flushed_by_the_next(
    make_pipeline: MakePipeline,
) -> None:
    store, first = MemoryWindowStore(), Digests()
    pipeline = await make_pipeline(first, batchers=durable(store, timeout=0.3))
    await send_batch(pipeline, ["ann:1", "bob:1"])
    await pipeline.stop()
    assert first.batches == []
    second = Digests()
    await make_pipeline(second, batchers=durable(store, timeout=0.3))
    await eventually(lambda: len(second.batches) == 2)


async def test_a_backlog_of_few_keys_is_flushed_without_waiting_between_rounds(
    make_pipeline: MakePipeline,
) -> None:
    """Three recipients with eight full windows each (a fan-in: many notifications, few
    keys): a round closes one window a key, and the next round follows at once while
    windows were claimed, not a poll interval later (the 30-minute soak drained 100,000
    notifications for three users at 390 a second, a round every half second)."""
    store, handlers = MemoryWindowStore(), Digests()
    stored = [
        StoredMessage(key, json.dumps({"payload": str(i)}), "{}", f"{key}-{i}")
        for i in range(40)
        for key in ("ann", "bob", "cid")
    ]
    await store.append("email", stored, WindowRule(5, 60.0), time.time())
    await make_pipeline(handlers, batchers=durable(store, size=5, poll_interval=5.0))
    await eventually(lambda: len(handlers.batches) == 24, timeout=2.0)


async def test_the_live_view_shows_the_stored_windows(make_pipeline: MakePipeline) -> None:
    store = MemoryWindowStore()
    pipeline = await make_pipeline(Digests(), batchers=durable(store))
    await send_batch(pipeline, ["ann:1", "ann:2", "bob:1"])
    await eventually(lambda: pipeline.open_batches()["email"]["messages"] == 3)
    view = pipeline.open_batches()["email"]
    assert (view["batches"], view["busiest"][0], view["stored"]) == (2, ["ann", 2], True)


async def test_flush_outcomes_are_events(make_pipeline: MakePipeline) -> None:
    store, handlers = MemoryWindowStore(), Digests(failures=1)
    events: list[Event] = []
    pipeline = await make_pipeline(handlers, batchers=durable(store, size=1))
    pipeline.events.subscribe(events.append, kinds={"window.flush"})
    await push_messages(pipeline, ["ann:1"])
    await eventually(lambda: len(events) == 2)
    assert [(e.reason, e.successful, e.failed) for e in events] == [
        ("retry", 0, 1),
        ("done", 1, 0),
    ]


# -- options -----------------------------------------------------------------------------


def test_a_durable_batcher_needs_an_int_batch_size() -> None:
    from ingest import byte_budget

    with pytest.raises(ValueError, match="int batch_size"):
        Batcher(
            batch_size=byte_budget(100), windows=DurableWindows(MemoryWindowStore(), DeadLetters())
        )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"store": object()}, "WindowStore"),
        ({"dead_letters": object()}, "dead_letter"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"delays": ()}, "delays"),
    ],
    ids=["store", "dead-letters", "attempts", "delays"],
)
def test_durable_windows_refuse_what_cannot_work(options: dict[str, Any], match: str) -> None:
    given: dict[str, Any] = {"store": MemoryWindowStore(), "dead_letters": DeadLetters()}
    with pytest.raises((TypeError, ValueError), match=match):
        DurableWindows(**{**given, **options})


def test_durable_windows_need_no_prefetch_room() -> None:
    shape = PipelineShape("p", Processors(), durable(MemoryWindowStore(), size=500), False)
    shape.check_bound(50, "prefetch_count")  # would need 667 with an in-memory batcher
    assert shape.batch_sizes() == 0
