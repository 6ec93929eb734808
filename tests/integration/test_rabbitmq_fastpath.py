"""The aiormq fast path on the real broker: ingest's connections only, and a refused fast
path leaves a connector that consumes as plain aiormq does."""

from __future__ import annotations

from typing import Any

import aiormq
import pytest
from aiormq.connection import FrameReceiver
from structlog.testing import capture_logs

from ingest import Handlers, Message
from ingest.rabbitmq import _fastpath as fastpath
from ingest.rabbitmq._connection import open_connection

from .conftest import Broker, MakeRabbitPipeline, eventually, publish, queue_depth

AIORMQ_GET_FRAME = FrameReceiver.get_frame


@pytest.fixture
def fast_reads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The receiver of every frame read by the fast path's reader from now on."""
    receivers: list[Any] = []
    read = fastpath.get_frame

    async def get_frame(receiver: Any) -> tuple[int, int, Any]:
        receivers.append(receiver)
        return await read(receiver)

    monkeypatch.setattr(fastpath, "get_frame", get_frame)
    return receivers


async def test_a_plain_aiormq_connection_opened_after_ingests_keeps_aiormqs_reader(
    broker: Broker, queue_name: str, fast_reads: list[Any]
) -> None:
    ours = await open_connection(broker.amqp_url)
    try:
        await (await ours.channel()).queue_declare(queue_name, auto_delete=True)
        assert fast_reads  # ingest's connection reads with the fast path
        ours_receivers = set(map(id, fast_reads))
        plain = await aiormq.connect(broker.amqp_url)
        try:
            channel = await plain.channel()
            await channel.basic_publish(b"plain", routing_key=queue_name)
            got = await channel.basic_get(queue_name, no_ack=True)
        finally:
            await plain.close()
    finally:
        await ours.close()
    assert got.body == b"plain"
    assert set(map(id, fast_reads)) == ours_receivers  # no frame of the plain one
    assert FrameReceiver.get_frame is AIORMQ_GET_FRAME


class Collect(Handlers):
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.messages.append(message)
        return message


async def test_with_the_fast_path_refused_a_pipeline_consumes_and_acks_as_plain_aiormq(
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
    fast_reads: list[Any],
) -> None:
    monkeypatch.setattr(fastpath, "_version", lambda distribution: "99.0.0")
    monkeypatch.setattr(fastpath, "_reported", set())
    handlers = Collect()
    with capture_logs() as logs:
        pipeline, _producer = await make_rabbit_pipeline(
            handlers, concurrency=2, metadata=("routing_key", "headers")
        )
    bodies = {b"m%d" % i for i in range(300)}
    await publish(amqp, queue_name, *sorted(bodies), headers={"k": "v"})

    async def all_handled() -> bool:
        return {m.data for m in handlers.messages} == bodies

    await eventually(all_handled)
    await pipeline.stop()
    assert await queue_depth(amqp, queue_name) == 0  # every one acked: none came back
    assert handlers.messages[0].metadata == {"routing_key": queue_name, "headers": {"k": "v"}}
    assert len(handlers.messages) == len(bodies)  # none redelivered
    assert fast_reads == []
    refusals = [line for line in logs if line["event"].startswith("aiormq fast path")]
    assert refusals == [
        {
            "event": "aiormq fast path not used; plain aiormq instead",
            "reason": "aiormq 99.0.0 is installed; it was written for 7.2.x",
            "log_level": "warning",
        }
    ]
