"""Batchers: size, custom size, timeout, flush, batch keys, and handle_batch failures
(Broadway's batcher scenarios)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ingest import (
    Batcher,
    BatchInfo,
    CustomBatchSize,
    Handlers,
    InMemoryProducer,
    Message,
    Pipeline,
    Processors,
    byte_budget,
)
from ingest.producer import PipelineShape
from ingest.testing import push_messages, send_batch, send_message

from .conftest import MakePipeline


class Recorder(Handlers):
    """Routes `batcher:key:payload` strings; records every batch it sees."""

    def __init__(self) -> None:
        self.batches: list[tuple[BatchInfo, list[Any]]] = []

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        if isinstance(message.data, str) and message.data.count(":") == 2:
            batcher, key, _ = message.data.split(":")
            message.put_batcher(batcher).put_batch_key(key)
        return message

    async def handle_batch(
        self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
    ) -> list[Message]:
        self.batches.append((batch_info, [m.data for m in messages]))
        return messages

    def sizes(self) -> list[int]:
        return [info.size for info, _ in self.batches]

    def triggers(self) -> list[str]:
        return [info.trigger for info, _ in self.batches]


async def test_batches_close_when_they_reach_batch_size(make_pipeline: MakePipeline) -> None:
    handlers = Recorder()
    pipeline = await make_pipeline(
        handlers, batchers={"default": Batcher(batch_size=2, batch_timeout=60)}
    )
    await send_batch(pipeline, [1, 2, 3, 4])
    assert handlers.sizes() == [2, 2]
    assert handlers.triggers() == ["size", "size"]
    assert [data for _, data in handlers.batches] == [[1, 2], [3, 4]]


async def test_an_incomplete_batch_closes_on_timeout(make_pipeline: MakePipeline) -> None:
    handlers = Recorder()
    pipeline = await make_pipeline(
        handlers, batchers={"default": Batcher(batch_size=10, batch_timeout=0.05)}
    )
    result = await send_batch(pipeline, [1, 2, 3])
    assert result.successful_data == [1, 2, 3]
    assert handlers.batches[0][0] == BatchInfo("default", "default", None, 3, "timeout")


async def test_batch_timeout_counts_from_the_first_message_of_the_batch(
    make_pipeline: MakePipeline,
) -> None:
    handlers = Recorder()
    pipeline = await make_pipeline(
        handlers, batchers={"default": Batcher(batch_size=100, batch_timeout=0.25)}
    )
    pending = [await push_messages(pipeline, ["a"])]
    # Messages that keep arriving do not push the deadline back: "d" comes after it.
    for pause, item in [(0.1, "b"), (0.1, "c"), (0.15, "d")]:
        await asyncio.sleep(pause)
        pending.append(await push_messages(pipeline, [item]))
    for acks in pending:
        await acks.wait()
    assert [data for _, data in handlers.batches] == [["a", "b", "c"], ["d"]]
    assert handlers.triggers() == ["timeout", "timeout"]


async def test_a_custom_batch_size_function_decides_when_to_emit(
    make_pipeline: MakePipeline,
) -> None:
    # Emit whenever the running sum of the data reaches 10.
    def step(message: Message, acc: int) -> tuple[bool, int]:
        acc += message.data
        return (acc >= 10, acc)

    handlers = Recorder()
    pipeline = await make_pipeline(
        handlers,
        batchers={"default": Batcher(batch_size=CustomBatchSize(0, step), batch_timeout=0.05)},
    )
    await send_batch(pipeline, [4, 5, 1, 9, 1, 3])
    assert [data for _, data in handlers.batches] == [[4, 5, 1], [9, 1], [3]]
    assert handlers.triggers() == ["size", "size", "timeout"]


async def test_byte_budget_closes_batches_by_payload_weight(make_pipeline: MakePipeline) -> None:
    handlers = Recorder()
    pipeline = await make_pipeline(
        handlers, batchers={"default": Batcher(batch_size=byte_budget(10), batch_timeout=60)}
    )
    await send_batch(pipeline, [b"xxxx", b"xxxx", b"xx", b"xxxxxxxxxx"])
    assert handlers.sizes() == [3, 1]


async def test_a_raising_custom_size_fails_only_that_message(make_pipeline: MakePipeline) -> None:
    def step(message: Message, acc: int) -> tuple[bool, int]:
        return (acc + 1 >= 2, acc + len(message.data))

    handlers = Recorder()
    pipeline = await make_pipeline(
        handlers,
        batchers={"default": Batcher(batch_size=CustomBatchSize(0, step), batch_timeout=0.05)},
    )
    result = await send_batch(pipeline, ["ab", 3, "cd"])
    assert result.failed_reasons == [
        "batch_size raised TypeError: object of type 'int' has no len()"
    ]
    assert sorted(result.successful_data) == ["ab", "cd"]


async def test_flush_mode_closes_the_batch_at_once(make_pipeline: MakePipeline) -> None:
    handlers = Recorder()
    pipeline = await make_pipeline(
        handlers, batchers={"default": Batcher(batch_size=100, batch_timeout=60)}
    )
    result = await send_message(pipeline, "now", batch_mode="flush")
    assert result.successful_data == ["now"]
    assert handlers.batches == [(BatchInfo("default", "default", None, 1, "flush"), ["now"])]


async def test_flush_mode_takes_the_bulk_messages_before_it_along(
    make_pipeline: MakePipeline,
) -> None:
    handlers = Recorder()
    pipeline = await make_pipeline(
        handlers, batchers={"default": Batcher(batch_size=100, batch_timeout=60)}
    )
    pending = await push_messages(pipeline, ["a", "b"])
    await send_message(pipeline, "c", batch_mode="flush")
    await pending.wait()
    assert handlers.batches == [
        (BatchInfo("default", "default", None, 3, "flush"), ["a", "b", "c"])
    ]


async def test_each_batch_key_has_its_own_batch(make_pipeline: MakePipeline) -> None:
    handlers = Recorder()
    pipeline = await make_pipeline(
        handlers, batchers={"default": Batcher(batch_size=2, batch_timeout=60)}
    )
    await send_batch(pipeline, ["default:x:1", "default:y:1", "default:x:2", "default:y:2"])
    by_key = {info.batch_key: data for info, data in handlers.batches}
    assert by_key == {"x": ["default:x:1", "default:x:2"], "y": ["default:y:1", "default:y:2"]}


async def test_static_batchers_batch_separately(make_pipeline: MakePipeline) -> None:
    handlers = Recorder()
    pipeline = await make_pipeline(
        handlers,
        batchers={
            "cinema": Batcher(batch_size=2, batch_timeout=60),
            "musical": Batcher(batch_size=3, batch_timeout=60),
        },
    )
    await send_batch(
        pipeline, ["cinema:k:1", "musical:k:1", "cinema:k:2", "musical:k:2", "musical:k:3"]
    )
    assert sorted((info.batcher, info.size) for info, _ in handlers.batches) == [
        ("cinema", 2),
        ("musical", 3),
    ]


class RaisingBatch(Recorder):
    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        raise RuntimeError("database down")


async def test_an_exception_in_handle_batch_fails_the_whole_batch(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(RaisingBatch(), batchers={"default": Batcher(batch_size=3)})
    result = await send_batch(pipeline, [1, 2, 3])
    assert result.successful == []
    assert result.failed_reasons == ["handle_batch raised RuntimeError: database down"] * 3


class PartialBatch(Recorder):
    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        kept = [m for m in messages if m.data != 2]
        kept[0].failed("first one is bad")
        return kept


async def test_messages_missing_from_handle_batchs_return_are_failed_not_leaked(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(PartialBatch(), batchers={"default": Batcher(batch_size=3)})
    result = await send_batch(pipeline, [1, 2, 3])
    assert result.successful_data == [3]
    assert {m.data: m.failure_reason for m in result.failed} == {
        1: "first one is bad",
        2: "missing from the list handle_batch returned",
    }


class CopyingBatch(Recorder):
    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        stranger = Message(messages[1].data, acknowledger=messages[1].acknowledger)
        return [messages[0], stranger]


async def test_a_message_returned_in_place_of_one_of_the_batch_does_not_hide_it(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(CopyingBatch(), batchers={"default": Batcher(batch_size=2)})
    result = await send_batch(pipeline, [1, 2])
    assert result.successful_data == [1]
    assert {m.data: m.failure_reason for m in result.failed} == {
        2: "missing from the list handle_batch returned",
    }


class WrongReturnBatch(Recorder):
    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        return None


async def test_a_wrong_return_from_handle_batch_fails_the_batch(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(WrongReturnBatch(), batchers={"default": Batcher(batch_size=2)})
    result = await send_batch(pipeline, [1, 2])
    assert (
        result.failed_reasons
        == ["handle_batch raised TypeError: handle_batch must return a list, returned a NoneType"]
        * 2
    )


async def test_handle_failed_runs_in_the_batch_processor_for_a_failed_batch(
    make_pipeline: MakePipeline,
) -> None:
    class Reconfigure(RaisingBatch):
        async def handle_failed(self, messages, context):  # type: ignore[no-untyped-def]
            return [m.configure_ack(on_failure="reject_and_requeue_once") for m in messages]

    pipeline = await make_pipeline(Reconfigure(), batchers={"default": Batcher(batch_size=1)})
    result = await send_message(pipeline, "x")
    assert result.failed[0].ack_data == {"on_failure": "reject_and_requeue_once"}


@pytest.mark.parametrize(
    "concurrency", [1, 3], ids=["one-batch-processor", "three-batch-processors"]
)
async def test_batch_processors_all_receive_work(
    make_pipeline: MakePipeline, concurrency: int
) -> None:
    class Rendezvous(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.running = 0
            self.all_in = asyncio.Event()

        async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
            self.running += 1
            if self.running == concurrency:
                self.all_in.set()
            await asyncio.wait_for(self.all_in.wait(), 2)
            return messages

    handlers = Rendezvous()
    pipeline = await make_pipeline(
        handlers,
        processors=Processors(concurrency=2),
        batchers={"default": Batcher(batch_size=1, concurrency=concurrency)},
    )
    result = await send_batch(pipeline, range(concurrency))
    assert len(result.successful) == concurrency


class Prefetching(InMemoryProducer):
    """Delivers its queue like a broker with a prefetch: never more than that many
    unacknowledged (8 unless told)."""

    def __init__(self, data: list[Any], prefetch: int = 8) -> None:
        super().__init__()
        self.PREFETCH = prefetch
        self.waiting = list(data)
        self.unacked = 0
        self.acked: list[Any] = []

    def bind(self, shape: PipelineShape) -> int:
        return self.PREFETCH

    async def start(self, sink: Any) -> None:
        await super().start(sink)
        self._deliver()

    def _deliver(self) -> None:
        while self.waiting and self.unacked < self.PREFETCH:
            self.unacked += 1
            assert self._sink is not None
            assert self._sink.push_nowait([Message(self.waiting.pop(0), self)])

    async def ack(self, successful: list[Message], failed: list[Message]) -> None:
        self.unacked -= len(successful) + len(failed)
        self.acked += [m.data for m in successful + failed]
        self._deliver()

    def configure(self, ack_data: Any, options: Any) -> Any:
        return ack_data


async def test_dynamic_keys_never_stall_a_pipeline_behind_its_prefetch() -> None:
    # Eight keys, five messages each, batches of 100 with a one-minute timeout: a broker
    # with prefetch 8 sends one message per key and waits, every batch waits a minute.
    data = [f"default:{i % 8}:{i}" for i in range(40)]
    producer = Prefetching(data)
    handlers = Recorder()
    pipeline = Pipeline(
        "p", handlers, producer, batchers={"default": Batcher(batch_size=100, batch_timeout=60)}
    )
    async with pipeline:
        await asyncio.sleep(0.5)
        assert producer.waiting == []  # everything was delivered
        # Only what sits in the last open batches (under 3/4 of the prefetch) still waits.
        assert len(producer.acked) >= len(data) - 6
        assert set(handlers.triggers()) == {"flush"}


@pytest.mark.parametrize(("prefetch", "all_by_size"), [(8, True), (5, False)])
async def test_with_the_prefetch_the_check_asks_for_static_batches_fill_by_size(
    prefetch: int, all_by_size: bool
) -> None:
    batchers = {"a": Batcher(batch_size=3, batch_timeout=60), "b": Batcher(batch_size=3)}
    shape = PipelineShape("p", Processors(), batchers, partitioned=False)
    assert shape.bound_for_full_batches() == 8  # one batch of each (6) is 3/4 of 8
    data = [f"{'ab'[i % 2]}:k:{i}" for i in range(24)]
    producer = Prefetching(data, prefetch=prefetch)
    handlers = Recorder()
    async with Pipeline("p", handlers, producer, batchers=batchers):
        for _ in range(100):
            if len(producer.acked) == len(data):
                break
            await asyncio.sleep(0.01)
    assert len(producer.acked) == len(data)  # never a stall
    # Below the bound (the control), open batches reach 3/4 of the prefetch and close early.
    assert (set(handlers.triggers()) == {"size"}) is all_by_size
