"""Message helpers change the message and return it, so they chain."""

from __future__ import annotations

from ingest import OK, Failed, Message
from ingest.testing import CollectingAcknowledger


async def test_helpers_chain_and_change_the_message() -> None:
    message = Message("a,1", CollectingAcknowledger(1))
    same = (
        message.update_data(lambda data: data.split(","))
        .put_batcher("cinema")
        .put_batch_key("1")
        .put_batch_mode("flush")
    )
    assert same is message
    assert (message.data, message.batcher, message.batch_key, message.batch_mode) == (
        ["a", "1"],
        "cinema",
        "1",
        "flush",
    )
    assert message.put_data("b").data == "b"


async def test_defaults_match_broadway() -> None:
    message = Message("x", CollectingAcknowledger(1))
    assert (message.batcher, message.batch_key, message.batch_mode) == (
        "default",
        "default",
        "bulk",
    )
    assert message.status is OK
    assert message.is_ok
    assert message.failure_reason is None


async def test_failed_sets_a_failed_status_with_its_reason() -> None:
    message = Message("x", CollectingAcknowledger(1)).failed("bookings-closed")
    assert message.status == Failed("bookings-closed")
    assert message.failure_reason == "bookings-closed"
    assert not message.is_ok


async def test_configure_ack_stores_validated_options_in_ack_data() -> None:
    message = Message("x", CollectingAcknowledger(1))
    message.configure_ack(on_success="ack").configure_ack(on_failure="reject_and_requeue_once")
    assert message.ack_data == {"on_success": "ack", "on_failure": "reject_and_requeue_once"}


async def test_ack_immediately_acks_now_and_detaches_the_acknowledger() -> None:
    acknowledger = CollectingAcknowledger(1)
    message = await Message("x", acknowledger).ack_immediately()
    assert acknowledger.result.successful == [message]
    await message.acknowledger.ack([message], [])
    assert acknowledger.result.successful == [message]  # not acknowledged twice
