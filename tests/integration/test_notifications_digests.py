"""The notifications pipeline's digests against a real database, with the in-memory
producer: one notification appears in one digest even when two batches for the same
recipient carry it at the same time."""

from __future__ import annotations

from pathlib import Path

from ingest import Batcher, InMemoryProducer, Pipeline
from ingest.testing import push_messages
from pipelines.db import Database
from pipelines.mail import OutboxMailer
from pipelines.notifications import NotificationHandlers


async def test_a_notification_in_two_concurrent_batches_is_emailed_once(
    database_url: str, tmp_path: Path
) -> None:
    db = Database(database_url)
    await db.start()
    outbox = tmp_path / "outbox"
    handlers = NotificationHandlers(db, OutboxMailer(outbox), "ingest@example.com", 65536)
    # Batches of one, two batch processors: the two copies are handled side by side.
    pipeline = Pipeline(
        "notifications",
        handlers,
        InMemoryProducer(),
        batchers={"email": Batcher(batch_size=1, concurrency=2)},
    )
    try:
        async with pipeline:
            first = await push_messages(
                pipeline, [b"email,foo@email.com"], metadata={"message_id": "n-1"}
            )
            again = await push_messages(
                pipeline, [b"email,foo@email.com"], metadata={"message_id": "n-1"}
            )
            results = [await first.wait(5), await again.wait(5)]
        assert [len(result.successful) for result in results] == [1, 1]
        assert len(list(outbox.glob("*.eml"))) == 1
        assert await db.sent(["n-1"]) == {"n-1"}
    finally:
        await db.close()
