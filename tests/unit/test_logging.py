"""Failure logging: each failed message is one line with its pipeline, message_id and
reason, and its batcher and batch key when it failed in a batch."""

from __future__ import annotations

from typing import Any

from structlog.testing import capture_logs

from ingest import Batcher, BatchInfo, Handlers, Message
from ingest.service.logging import log_failures
from ingest.testing import send_batch

from .conftest import MakePipeline


class FailsTwice(Handlers):
    """`bad` fails in handle_message; `late` reaches batcher `b` and fails there."""

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        if message.data == "bad":
            return message.failed("not a booking")
        return message.put_batcher("b").put_batch_key("user-1")

    async def handle_batch(
        self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
    ) -> list[Message]:
        return [m.failed("sold out") if m.data == "late" else m for m in messages]


async def test_each_failed_message_is_one_line_with_its_context(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(FailsTwice(), batchers={"b": Batcher(batch_size=2)})
    pipeline.events.subscribe(log_failures)
    with capture_logs() as logs:
        await send_batch(
            pipeline,
            ["bad", "late", "fine"],
            metadata={"message_id": "m-1"},
        )
    failures = sorted(
        (line for line in logs if line["event"] == "message failed"),
        key=lambda line: line["reason"],
    )
    assert [
        {k: v for k, v in line.items() if k not in ("log_level", "stage")} for line in failures
    ] == [
        {
            "event": "message failed",
            "pipeline": "test",
            "message_id": "m-1",
            "reason": "not a booking",
        },
        {
            "event": "message failed",
            "pipeline": "test",
            "message_id": "m-1",
            "reason": "sold out",
            "batcher": "b",
            "batch_key": "user-1",
        },
    ]
