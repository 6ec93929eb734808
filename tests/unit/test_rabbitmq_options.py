"""RabbitMQ options, the prefetch check and backoff (no broker)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from ingest import Batcher, Handlers, Message, Pipeline, Processors
from ingest.rabbitmq import (
    Backoff,
    Binding,
    ProducerStats,
    QueueDeclare,
    RabbitMQOptions,
    RabbitMQProducer,
    RetryPolicy,
)
from ingest.rabbitmq._backoff import reconnect_delay
from ingest.rabbitmq.acknowledger import ChannelAcknowledger
from ingest.rabbitmq.connection import redact


class Routes(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        return messages


THREE_BATCHERS = {
    "cinema": Batcher(batch_size=75),
    "musical": Batcher(batch_size=100),
    "default": Batcher(batch_size=50),
}


def test_a_prefetch_too_small_for_the_batchers_is_refused_with_what_to_raise() -> None:
    producer = RabbitMQProducer(RabbitMQOptions(queue="q", prefetch_count=100))
    with pytest.raises(ValueError, match=r"raise prefetch_count to at least 300") as error:
        Pipeline("bookings", Routes(), producer, batchers=THREE_BATCHERS)
    assert "cinema (75), musical (100), default (50)" in str(error.value)


def test_without_a_prefetch_one_the_batchers_can_fill_is_chosen() -> None:
    producer = RabbitMQProducer(RabbitMQOptions(queue="q"))
    Pipeline("bookings", Routes(), producer, batchers=THREE_BATCHERS)
    # A batch in each batch processor and one filling, the processor's demand (10), and
    # twice as much again for acknowledgements waiting to go in one frame.
    assert producer.prefetch_count == 3 * (450 + 10)


def test_the_chosen_prefetch_has_room_for_every_batch_processor() -> None:
    batchers = {
        "cinema": Batcher(batch_size=75, concurrency=2),
        "musical": Batcher(batch_size=100, concurrency=3),
    }
    producer = RabbitMQProducer(RabbitMQOptions(queue="q"))
    Pipeline("bookings", Routes(), producer, batchers=batchers)
    assert producer.prefetch_count == 3 * (3 * 75 + 4 * 100 + 10)


def test_the_pipeline_intake_holds_everything_the_broker_may_send() -> None:
    producer = RabbitMQProducer(RabbitMQOptions(queue="q", prefetch_count=500, concurrency=2))
    Pipeline("p", Routes(), producer, processors=Processors(concurrency=2))
    assert producer.prefetch == 1000  # what bind() tells the pipeline to make room for


def test_a_per_producer_prefetch_count_counts_in_what_the_producer_holds() -> None:
    options = RabbitMQOptions(
        queue="q", prefetch_count=500, concurrency=3, per_producer={1: {"prefetch_count": 5}}
    )
    producer = RabbitMQProducer(options)
    Pipeline("p", Routes(), producer)
    assert producer.prefetch == 500 + 5 + 500


@pytest.mark.parametrize(
    ("options", "error"),
    [
        pytest.param(
            {"prefetch_count": 0}, "prefetch_count must be an int >= 1", id="zero-prefetch"
        ),
        pytest.param(
            {"on_failure": "requeue"}, "on_failure must be one of ack, reject", id="bad-action"
        ),
        pytest.param(
            {"on_failure": "retry"},
            "on_failure='retry' needs a retry policy",
            id="retry-without-policy",
        ),
        pytest.param(
            {"on_success": "retry", "retry": RetryPolicy()},
            "on_success must be one of ack, reject, reject_and_requeue, reject_and_requeue_once,",
            id="retry-on-success",
        ),
        pytest.param({"port": 70000}, "port must be an int from 1 to 65535", id="bad-port"),
        pytest.param({"heartbeat": -1}, "heartbeat must be an int from 0", id="bad-heartbeat"),
        pytest.param(
            {"prefetch_size": "1MB"}, "prefetch_size must be an int from 0", id="bad-prefetch-size"
        ),
        pytest.param(
            {"metadata": ("delivery_tag", "colour")},
            r"unknown metadata fields \['colour'\]",
            id="bad-metadata",
        ),
        pytest.param({"url": "http://localhost"}, "url must be amqp:// or amqps://", id="http-url"),
        pytest.param(
            {"per_producer": {3: {}}}, "per_producer key 3 is not a producer index", id="bad-index"
        ),
        pytest.param(
            {"concurrency": 2, "per_producer": {1: {"colour": 1}}},
            r"per_producer\[1\] has unknown options",
            id="bad-override",
        ),
    ],
)
def test_invalid_options_are_refused(options: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        RabbitMQOptions(queue="q", **options)


async def _hook(channel: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("options", "error"),
    [
        pytest.param({"queue": 123}, r"queue must be a queue name \(str\)", id="queue-int"),
        pytest.param({"url": b"amqp://mq"}, "url must be an amqp:// URL", id="url-bytes"),
        pytest.param({"host": None}, "host must be a host name", id="host-none"),
        pytest.param({"username": 1}, "username must be a str", id="username-int"),
        pytest.param({"password": None}, "password must be a str", id="password-none"),
        pytest.param({"virtual_host": 1}, "virtual_host must be a str", id="vhost-int"),
        pytest.param(
            {"ssl_context": True}, r"ssl_context must be an ssl.SSLContext", id="ssl-bool"
        ),
        pytest.param({"connection_name": 7}, "connection_name must be a str", id="name-int"),
        pytest.param(
            {"prefetch_count": True}, "prefetch_count must be an int >= 1", id="prefetch-bool"
        ),
        pytest.param(
            {"declare": {"durable": True}},
            r"declare must be a QueueDeclare\(...\) or None",
            id="declare-dict",
        ),
        pytest.param(
            {"bindings": Binding("amq.topic")},
            r"bindings must be a tuple of Binding",
            id="bindings-one-binding",
        ),
        pytest.param(
            {"bindings": [Binding("amq.topic")]},
            r"bindings must be a tuple of Binding",
            id="bindings-list",
        ),
        pytest.param(
            {"bindings": (("amq.topic", "orders.#"),)},
            r"bindings\[0\] must be a Binding\(exchange, routing_key\)",
            id="binding-tuple",
        ),
        pytest.param(
            {"retry": {"max_attempts": 3}}, r"retry must be a RetryPolicy", id="retry-dict"
        ),
        pytest.param({"dead_letter_queue": 0}, "dead_letter_queue must be", id="dlq-int"),
        pytest.param(
            {"metadata": "headers"}, r"metadata must be a tuple of field names", id="metadata-str"
        ),
        pytest.param({"backoff": "exp"}, r"backoff must be a Backoff", id="backoff-str"),
        pytest.param(
            {"after_connect": "setup"}, "after_connect must be an async function", id="hook-str"
        ),
        pytest.param({"consumer_tag": 1}, "consumer_tag must be a str", id="consumer-tag-int"),
        pytest.param(
            {"consume_exclusive": "yes"}, "consume_exclusive must be a bool", id="exclusive-str"
        ),
        pytest.param(
            {"consume_arguments": [("x-priority", 1)]},
            "consume_arguments must be a mapping",
            id="consume-arguments-list",
        ),
        pytest.param({"no_ack": "false"}, "no_ack must be a bool", id="no-ack-str"),
        pytest.param(
            {"concurrency": True}, "concurrency must be an int >= 1", id="concurrency-bool"
        ),
        pytest.param(
            {"per_producer": [{}]}, "per_producer must be a mapping", id="per-producer-list"
        ),
        pytest.param(
            {"per_producer": {0: "fast"}},
            r"per_producer\[0\] must be a mapping of options",
            id="per-producer-value-str",
        ),
        pytest.param(
            {"per_producer": {0: {"prefetch_count": "5"}}},
            r"per_producer\[0\]: prefetch_count must be an int >= 1",
            id="per-producer-bad-prefetch",
        ),
        pytest.param(
            {"per_producer": {0: {"concurrency": 2}}},
            r"per_producer\[0\] cannot set concurrency",
            id="per-producer-concurrency",
        ),
    ],
)
def test_options_of_the_wrong_type_are_refused_when_built(
    options: dict[str, Any], error: str
) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        RabbitMQOptions(**{"queue": "q", **options})


@pytest.mark.parametrize(
    ("build", "error"),
    [
        pytest.param(lambda: Binding(123), "Binding exchange must be", id="binding-exchange-int"),
        pytest.param(
            lambda: Binding("x", routing_key=None),
            "Binding routing_key must be a str",
            id="binding-routing-key-none",
        ),
        pytest.param(
            lambda: Binding("x", arguments=[("a", 1)]),
            "Binding arguments must be a mapping",
            id="binding-arguments-list",
        ),
        pytest.param(
            lambda: QueueDeclare(durable="yes"),
            "QueueDeclare durable must be a bool",
            id="declare-durable-str",
        ),
        pytest.param(
            lambda: QueueDeclare(arguments=None),
            "QueueDeclare arguments must be a mapping",
            id="declare-arguments-none",
        ),
        pytest.param(
            lambda: RetryPolicy(max_attempts="3"),
            "retry max_attempts must be an int >= 1",
            id="retry-attempts-str",
        ),
        pytest.param(
            lambda: RetryPolicy(max_attempts=True),
            "retry max_attempts must be an int >= 1",
            id="retry-attempts-bool",
        ),
        pytest.param(
            lambda: RetryPolicy(delays=[1.0, 5.0]),
            r"retry delays must be a tuple of seconds",
            id="retry-delays-list",
        ),
        pytest.param(
            lambda: RetryPolicy(delays=5.0),
            r"retry delays must be a tuple of seconds",
            id="retry-delays-number",
        ),
        pytest.param(lambda: Backoff("exp", min="1"), "backoff min must be", id="backoff-min-str"),
    ],
)
def test_option_values_of_the_wrong_type_are_refused_when_built(build: Any, error: str) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        build()


def test_backoff_and_retry_values_are_checked() -> None:
    with pytest.raises(ValueError, match="backoff max"):
        Backoff("exp", min=5, max=1)
    with pytest.raises(ValueError, match="retry delays"):
        RetryPolicy(delays=())


def test_the_default_failure_action_never_loops() -> None:
    plain = RabbitMQOptions(queue="q")
    retrying = RabbitMQOptions(queue="q", retry=RetryPolicy())
    assert plain.failure_action(raised=True) == "reject"
    assert retrying.failure_action(raised=True) == "retry"
    assert retrying.failure_action(raised=False) == "reject"


def test_connection_url_from_parts_and_redaction() -> None:
    options = RabbitMQOptions(
        queue="q", host="mq", port=5673, username="u", password="p@ss", virtual_host="/"
    )
    assert options.connection_url() == "amqp://u:p%40ss@mq:5673/%2F"
    assert redact(options.connection_url()) == "amqp://u:***@mq:5673/%2F"
    assert "p@ss" not in repr(options)


def test_per_producer_overrides_apply_to_their_index_only() -> None:
    options = RabbitMQOptions(
        queue="q", concurrency=2, per_producer={1: {"connection_name": "second"}}
    )
    assert options.for_producer(0).connection_name is None
    assert options.for_producer(1).connection_name == "second"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("exp", [1.0, 2.0, 4.0, 8.0, 8.0]), ("stop", [None] * 5)],
    ids=["exp", "stop"],
)
def test_reconnect_delays(kind: Any, expected: list[float | None]) -> None:
    backoff = Backoff(kind, min=1, max=8)
    assert [reconnect_delay(backoff, attempt) for attempt in range(1, 6)] == expected


def test_random_reconnect_delays_stay_within_bounds() -> None:
    rng = random.Random(1)
    for kind in ("rand", "rand_exp"):
        delays = [reconnect_delay(Backoff(kind, min=1, max=8), a, rng) for a in range(1, 50)]  # type: ignore[arg-type]
        assert all(d is not None and 1 <= d <= 8 for d in delays)


def test_retry_delays_repeat_the_last_one() -> None:
    policy = RetryPolicy(max_attempts=5, delays=(1.0, 10.0))
    assert [policy.delay(n) for n in range(1, 5)] == [1.0, 10.0, 10.0, 10.0]


def test_configure_ack_refuses_retry_on_success_and_retry_without_a_policy() -> None:
    def acknowledger(options: RabbitMQOptions) -> ChannelAcknowledger:
        # configure() only reads the options: no channel is needed to check them.
        return ChannelAcknowledger(None, None, options, ProducerStats(), 10)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="on_success cannot be 'retry'"):
        acknowledger(RabbitMQOptions(queue="q", retry=RetryPolicy())).configure(
            None, {"on_success": "retry"}
        )
    with pytest.raises(ValueError, match="needs the producer's retry policy"):
        acknowledger(RabbitMQOptions(queue="q")).configure(None, {"on_failure": "retry"})
