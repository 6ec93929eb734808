"""Supervision: an exception escaping a stage (or a producer task) crashes the pipeline,
which is restarted in the same process, up to `max_restarts` within `max_seconds`; past
that it fails. Never a message's failure, never silent."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from ingest import Batcher, Event, Handlers, InMemoryProducer, Message, Pipeline, Sink
from ingest.exceptions import PipelineFailed, StageCrashed
from ingest.testing import push_messages, send_message
from tests.support import eventually

from .conftest import MakePipeline


class Crash(BaseException):
    """Not an Exception: hooks' failures are caught, this escapes the stage (like a bug in
    the engine would)."""


class CrashOn(Handlers):
    """Crashes the stage running `hook` on data "crash"; counts what it handled."""

    def __init__(self, hook: str = "handle_message") -> None:
        self.hook = hook
        self.handled: list[Any] = []

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        if self.hook == "handle_message" and message.data == "crash":
            raise Crash("stage crash")
        self.handled.append(message.data)
        return message.put_batcher("b")

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        if self.hook == "handle_batch" and any(m.data == "crash" for m in messages):
            raise Crash("batch stage crash")
        return messages


async def wait_for_state(pipeline: Pipeline, state: str, timeout: float = 5.0) -> None:
    async def reached() -> bool:
        return pipeline.state == state

    await eventually(reached, timeout)


@pytest.mark.parametrize("hook", ["handle_message", "handle_batch"])
async def test_a_stage_crash_restarts_the_pipeline_which_then_processes_again(
    make_pipeline: MakePipeline, hook: str
) -> None:
    pipeline = await make_pipeline(CrashOn(hook), batchers={"b": Batcher(batch_size=1)})
    events: list[Event] = []
    pipeline.events.subscribe(events.append)
    crashed = await push_messages(pipeline, ["crash"])
    await wait_for_state(pipeline, "restarting")
    assert isinstance(pipeline.failure, StageCrashed)
    assert pipeline.crashes == 1
    await wait_for_state(pipeline, "running")
    assert (await send_message(pipeline, "after")).successful_data == ["after"]
    # What the crashed generation held was never acknowledged (a broker redelivers it).
    assert crashed.result.successful == crashed.result.failed == []
    assert [e.kind for e in events if e.kind.startswith("pipeline.")] == [
        "pipeline.crash",
        "pipeline.start",
    ]


async def test_a_crash_is_logged_once_with_its_traceback_and_stage(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(CrashOn())
    with capture_logs() as logs:
        await push_messages(pipeline, ["crash"])
        await wait_for_state(pipeline, "restarting")
    crashes = [log for log in logs if log["event"].startswith("pipeline crashed")]
    assert len(crashes) == 1
    assert isinstance(crashes[0]["exc_info"], StageCrashed)
    assert "stage processor_0 crashed: Crash('stage crash')" in crashes[0]["error"]


async def test_past_the_restart_limit_the_pipeline_fails_and_wait_returns(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(CrashOn(), max_restarts=1, max_seconds=30)
    await push_messages(pipeline, ["crash"])
    await wait_for_state(pipeline, "restarting")
    await wait_for_state(pipeline, "running")  # restarted once
    await push_messages(pipeline, ["crash"])
    await asyncio.wait_for(pipeline.wait(), 5)
    assert pipeline.state == "failed"
    assert isinstance(pipeline.failure, PipelineFailed)
    assert "crashed 2 times within 30s (max_restarts=1)" in str(pipeline.failure)
    await pipeline.stop()
    assert pipeline.state == "failed"


async def test_stop_while_waiting_to_restart_stops_at_once(make_pipeline: MakePipeline) -> None:
    pipeline = await make_pipeline(CrashOn())
    await push_messages(pipeline, ["crash"])
    await wait_for_state(pipeline, "restarting")
    await asyncio.wait_for(pipeline.stop(), 1)
    assert pipeline.state == "stopped"


class CrashingProducer(InMemoryProducer):
    """Spawns a task through the sink that crashes on its first start only."""

    def __init__(self) -> None:
        super().__init__()
        self.starts = 0

    async def start(self, sink: Sink) -> None:
        await super().start(sink)
        self.starts += 1
        if self.starts == 1:
            sink.spawn(self._fail(), "feeder")

    async def _fail(self) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("feeder broke")


async def test_a_producer_task_that_raises_crashes_and_restarts_the_pipeline() -> None:
    producer = CrashingProducer()
    pipeline = Pipeline("p", CrashOn(), producer, batchers={"b": Batcher(batch_size=1)})
    await pipeline.start()
    try:
        await wait_for_state(pipeline, "restarting")
        assert "stage feeder crashed: RuntimeError('feeder broke')" in str(pipeline.failure)
        await wait_for_state(pipeline, "running")
        assert producer.starts == 2
        assert (await send_message(pipeline, "ok")).successful_data == ["ok"]
    finally:
        await pipeline.stop()


class RefusingProducer(InMemoryProducer):
    async def start(self, sink: Sink) -> None:
        raise FileNotFoundError("no such file: input.csv")


async def test_a_producer_that_cannot_start_fails_the_start() -> None:
    pipeline = Pipeline("p", CrashOn(), RefusingProducer())
    with pytest.raises(FileNotFoundError, match=r"input\.csv"):
        await pipeline.start()
    assert pipeline.state == "failed"
    await pipeline.stop()


async def test_the_options_of_the_restart_limit_are_checked() -> None:
    with pytest.raises(ValueError, match="max_restarts must be an int >= 0"):
        Pipeline("p", CrashOn(), InMemoryProducer(), max_restarts=-1)
    with pytest.raises(ValueError, match="max_seconds must be a number of seconds > 0"):
        Pipeline("p", CrashOn(), InMemoryProducer(), max_seconds=0)


class Checks(Handlers):
    """Fails every message in prepare_messages, records what handle_message sees."""

    def __init__(self) -> None:
        self.handled: list[Any] = []

    async def prepare_messages(self, messages: list[Message], context: Any) -> list[Message]:
        return [m.failed("bad payload") if m.data == "bad" else m for m in messages]

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.handled.append(message.data)
        return message


async def test_messages_failed_in_prepare_messages_skip_handle_message(
    make_pipeline: MakePipeline,
) -> None:
    # Broadway passes them on to handle_message; ingest does not (README, Hooks).
    handlers = Checks()
    pipeline = await make_pipeline(handlers)
    pending = await push_messages(pipeline, ["bad", "good"])
    result = await pending.wait()
    assert handlers.handled == ["good"]
    assert result.failed_reasons == ["bad payload"]


def test_sink_spawn_is_part_of_the_producer_contract() -> None:
    spawn: Sequence[str] = [name for name in dir(Sink) if not name.startswith("_")]
    assert "spawn" in spawn


async def test_a_cancelled_supervisor_fails_the_pipeline_visibly(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(CrashOn())
    task = next(t for t in asyncio.all_tasks() if t.get_name() == "test")
    task.cancel()
    await pipeline.wait()
    assert pipeline.state == "failed"
    assert "the supervisor was cancelled" in str(pipeline.failure)
