"""Partitions and replicas (no broker): who owns what, who stands by, how a message is
keyed, and where a replica's index comes from."""

from __future__ import annotations

import pytest

from ingest import Message
from ingest.rabbitmq import Partitions, QueueDeclare, RabbitMQOptions, RabbitMQProducer, Replica
from ingest.rabbitmq.queues import quorum
from ingest.service.settings import Settings
from ingest.testing import CollectingAcknowledger
from pipelines.notifications import build, by_recipient


def declare_of(queue: str) -> QueueDeclare:
    return quorum(f"{queue}.dlq", 20)


@pytest.mark.parametrize("replicas", [1, 2, 3, 5])
def test_every_partition_has_exactly_one_owner(replicas: int) -> None:
    partitions = Partitions("q", count=16)
    owned = [p for i in range(replicas) for p in partitions.owned(Replica(i, replicas))]
    assert sorted(owned) == list(range(16))


def test_a_replica_consumes_its_own_partitions_at_once_and_stands_by_for_the_others() -> None:
    partitions = Partitions("notifications_queue", count=4)
    base = RabbitMQOptions(queue="notifications_queue", prefetch_count=100)
    options = partitions.consumer_options(base, Replica(1, 2), declare_of, standby_delay=7.0)
    assert options.concurrency == 4
    consumers = [options.for_producer(p) for p in range(4)]
    assert [c.queue for c in consumers] == [f"notifications_queue.p0{p}" for p in range(4)]
    assert [c.consume_delay for c in consumers] == [7.0, 0.0, 7.0, 0.0]  # owns 1 and 3
    first = consumers[0]
    assert first.dlq_name == "notifications_queue.p00.dlq"  # each its own dead letters
    assert first.declare is not None
    assert first.declare.arguments["x-single-active-consumer"] is True
    assert first.declare.arguments["x-queue-type"] == "quorum"
    assert first.declare.arguments["x-dead-letter-routing-key"] == "notifications_queue.p00.dlq"
    assert [(b.exchange, b.routing_key) for b in first.bindings] == [
        ("notifications_queue.hash", "1")
    ]


def test_a_partitioned_message_goes_through_the_exchange_keyed_by_its_header() -> None:
    partitions = Partitions("q", header="recipient")
    message = partitions.message(b"{}", "ana@example.com", message_id="m1", headers={"a": 1})
    assert (message.exchange, message.routing_key, message.message_id) == ("q.hash", "", "m1")
    assert message.headers == {"a": 1, "recipient": "ana@example.com"}


@pytest.mark.parametrize(
    ("index", "count", "hostname", "expected"),
    [
        (None, None, "anything", Replica(0, 1)),
        (2, 3, "anything", Replica(2, 3)),
        (None, 3, "ingest-2", Replica(2, 3)),  # a StatefulSet's third pod
        (None, 3, "tickets-ingest-0", Replica(0, 3)),
    ],
)
def test_where_a_replica_finds_its_index(
    index: int | None, count: int | None, hostname: str, expected: Replica
) -> None:
    assert Replica.of(index, count, hostname) == expected


@pytest.mark.parametrize(
    ("index", "count", "hostname", "error"),
    [
        (1, None, "x", "needs INGEST_REPLICAS"),
        (None, 3, "laptop", "ending in -<ordinal>"),
        (3, 3, "x", r"in 0\.\.2"),
        (None, 2, "ingest-5", r"in 0\.\.1"),
    ],
)
def test_a_replica_that_cannot_know_its_index_says_what_to_set(
    index: int | None, count: int | None, hostname: str, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        Replica.of(index, count, hostname)


def test_the_notifications_pipeline_partitioned_by_a_setting() -> None:
    settings = Settings(pipelines={"notifications": {"partitions": 6}}, replica_index=1, replicas=3)
    hosted = build(settings)
    producer = hosted.pipeline.producer
    assert isinstance(producer, RabbitMQProducer)
    assert producer.options.concurrency == 6
    delays = [producer.options.for_producer(p).consume_delay for p in range(6)]
    assert delays == [5.0, 0.0, 5.0, 5.0, 0.0, 5.0]  # owns 1 and 4
    assert hosted.route is not None
    assert hosted.route.target == "notifications_queue.hash"
    message = hosted.route.message(b"email,ana@example.com")
    assert message.headers == {"recipient": "ana@example.com"}


async def test_one_recipient_one_lane_inside_a_replica() -> None:
    def keyed(recipient: object) -> int:
        metadata = {"headers": {"recipient": recipient}}
        return by_recipient(Message(b"", CollectingAcknowledger(0), metadata=metadata))

    assert keyed("ana@example.com") == keyed(b"ana@example.com")
    assert keyed("ana@example.com") != keyed("bob@example.com")
