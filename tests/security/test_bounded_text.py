"""Hostile text: what the service keeps of a text from input is bounded (ingest.text) —
a failure's reason, a message_id, a dead letter's headers — so that 65,000-character
fields that fail leave a small snapshot, bounded reasons and publishable dead letters."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest

from ingest import Failed, Message, bounded
from ingest.acknowledger import NOOP_ACKNOWLEDGER
from ingest.message import fail_with_exception
from ingest.rabbitmq import REASON_HEADER, Publisher
from ingest.rabbitmq.dead_letters import DeadLetters
from ingest.rabbitmq.window_dead_letters import PublishedDeadLetters
from ingest.text import TEXT_LIMIT, escaped
from tests.integration.service import RunningService, local_service
from tests.support import Broker, drain_queue, eventually, publish

HUGE = 65_000
SNAPSHOT_LIMIT = 64 * 1024  # a snapshot without failures is about 26 KB


# -- the helper -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["", "short", "x" * TEXT_LIMIT], ids=["empty", "short", "exactly-the-limit"]
)
def test_a_text_within_the_limit_is_kept_as_it_is(text: str) -> None:
    assert bounded(text) is text


@pytest.mark.parametrize(
    ("length", "limit"),
    [(TEXT_LIMIT + 1, TEXT_LIMIT), (HUGE, TEXT_LIMIT), (10**7, TEXT_LIMIT), (HUGE, 40)],
    ids=["one-over", "65000", "ten-million", "shortest-limit"],
)
def test_a_longer_text_is_cut_to_the_limit_and_says_how_much_was_left_out(
    length: int, limit: int
) -> None:
    text = "".join(chr(ord("a") + n % 26) for n in range(length))
    cut = bounded(text, limit)
    kept, marker = cut.split("…")
    assert len(cut) == limit
    assert text.startswith(kept)
    assert marker == f" ({length - len(kept):,} more characters)"


def test_a_limit_too_short_for_the_marker_is_refused() -> None:
    with pytest.raises(ValueError, match="limit must be at least 40 characters, not 10"):
        bounded("x" * 100, limit=10)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[31mred\r\nfake line", "\\x1b[31mred\\r\\nfake line"),
        ("nul\x00 del\x7f csi\x9b", "nul\\x00 del\\x7f csi\\x9b"),
        ("line\u2028separator", "line\\u2028separator"),
        ("tab\tand é ✓", "tab\\tand é ✓"),
    ],
    ids=["ansi-cr-lf", "nul-del-c1", "line-separator", "printable-kept"],
)
def test_control_characters_are_written_as_escapes(text: str, shown: str) -> None:
    assert escaped(text) == shown


# -- where the engine keeps a reason ----------------------------------------------------


def test_a_reason_given_to_failed_is_bounded() -> None:
    message = Message("x", NOOP_ACKNOWLEDGER).failed("unsupported type " + "x" * HUGE)
    reason = message.failure_reason
    assert reason is not None
    assert len(reason) == TEXT_LIMIT
    assert reason.startswith("unsupported type xxx")


def test_a_reason_from_an_exception_is_bounded() -> None:
    message = Message("x", NOOP_ACKNOWLEDGER)
    fail_with_exception(message, ValueError("x" * HUGE), "handle_message")
    assert isinstance(message.status, Failed)
    assert len(message.status.reason) == TEXT_LIMIT
    assert message.status.reason.startswith("handle_message raised ValueError: xxx")


def test_a_failed_status_made_directly_is_bounded() -> None:
    """As the engine makes them: `batch_key {key!r} is not hashable`, say."""
    assert len(Failed("batch_key " + "k" * HUGE).reason) == TEXT_LIMIT


# -- the real service -------------------------------------------------------------------


@pytest.fixture
async def service(broker: Broker, queue_name: str, tmp_path: Any) -> AsyncIterator[RunningService]:
    async with local_service(broker, queue_name, tmp_path) as running:
        yield running


def huge_notification(n: int) -> bytes:
    """A notification whose type, 65,000 characters long, is quoted by its failure."""
    return json.dumps({"type": f"{n}-" + "x" * HUGE, "recipient": "a@example.com"}).encode()


async def test_huge_failures_leave_the_snapshot_small(
    service: RunningService, queue_name: str, amqp: aiormq.abc.AbstractChannel
) -> None:
    await publish(amqp, f"{queue_name}-notifications", *map(huge_notification, range(50)))

    async def failures() -> list[dict[str, Any]]:
        _, body = await service.get_async("/api/snapshot")
        return list(json.loads(body)["pipelines"]["notifications"]["failures"])

    async def all_failed() -> bool:
        return len(await failures()) == 50

    await eventually(all_failed, timeout=30)
    _, body = await service.get_async("/api/snapshot")
    assert len(body.encode()) < SNAPSHOT_LIMIT  # 3.3 MB when reasons were kept whole
    for failure in await failures():
        assert failure["reason"].startswith("unsupported notification type '")
        assert len(failure["reason"]) <= TEXT_LIMIT


async def test_a_huge_failure_reason_is_bounded_in_its_dead_letter(
    service: RunningService, queue_name: str, amqp: aiormq.abc.AbstractChannel
) -> None:
    dlq = f"{queue_name}-notifications.dlq"
    await publish(amqp, f"{queue_name}-notifications", huge_notification(1), message_id="huge-1")

    async def dead_lettered() -> bool:
        declared = await amqp.queue_declare(dlq, passive=True)
        return declared.message_count == 1

    await eventually(dead_lettered, timeout=15)
    [letter] = await drain_queue(amqp, dlq)
    reason = (letter.header.properties.headers or {})[REASON_HEADER]
    assert isinstance(reason, str)
    assert reason.startswith("unsupported notification type '1-xxx")
    assert len(reason) <= TEXT_LIMIT


async def test_a_dead_letter_shows_a_foreign_huge_reason_bounded(
    broker: Broker, queue_name: str, amqp: aiormq.abc.AbstractChannel
) -> None:
    """A dead letter written by another tool (or by hand) may carry any reason."""
    queue = f"{queue_name}-work"
    await amqp.queue_declare(f"{queue}.dlq", durable=True)
    await publish(amqp, f"{queue}.dlq", b"{}", headers={REASON_HEADER: "r" * HUGE})
    async with DeadLetters(broker.amqp_url, queue) as dead:
        [letter] = await dead.show()
    assert letter.reason.startswith("rrr")
    assert len(letter.reason) == TEXT_LIMIT


# -- a durable window's dead letters -----------------------------------------------------


async def window_dead_letter(broker: Broker, queue_name: str, message: Message) -> Any:
    """`message` dead-lettered as a durable window's, as it arrives in the queue."""
    dlq = f"{queue_name}.dlq"
    async with Publisher(broker.amqp_url, declare_queues=[dlq]) as publisher:
        await PublishedDeadLetters(publisher, dlq, queue_name).dead_letter([message])
    connection = await aiormq.connect(broker.amqp_url)
    try:
        [letter] = await drain_queue(await connection.channel(), dlq)
    finally:
        await connection.close()
    return letter


async def test_a_windows_dead_letter_carries_a_bounded_reason(
    broker: Broker, queue_name: str
) -> None:
    message = Message({"n": 1}, NOOP_ACKNOWLEDGER).failed("sold out " + "x" * HUGE)
    letter = await window_dead_letter(broker, queue_name, message)
    reason = (letter.header.properties.headers or {})[REASON_HEADER]
    assert reason.startswith("sold out xxx")
    assert len(reason) <= TEXT_LIMIT


async def test_a_windows_dead_letter_cuts_a_long_message_id_to_what_amqp_holds(
    broker: Broker, queue_name: str
) -> None:
    """255 bytes: 200 'é' are 400 (kept whole, the publish failed and the window looped)."""
    message = Message({"n": 1}, NOOP_ACKNOWLEDGER, metadata={"message_id": "é" * 200})
    letter = await window_dead_letter(broker, queue_name, message.failed("sold out"))
    assert letter.header.properties.message_id == "é" * 127
