"""The RabbitMQ connector: producer, acknowledgement, retries, dead letters, publisher."""

from ingest.exceptions import PublishError, Unroutable
from ingest.rabbitmq._aiormq.events import frame_events
from ingest.rabbitmq.acknowledger import (
    ATTEMPTS_HEADER,
    EXCEPTION_HEADER,
    FAILED_AT_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    ChannelAcknowledger,
    Delivery,
    retry_queue_name,
)
from ingest.rabbitmq.connection import CONNECTION_ERRORS, client_name, open_connection, redact
from ingest.rabbitmq.instrumentation import PublishSpan, PublishTracer
from ingest.rabbitmq.options import (
    Backoff,
    Binding,
    QueueDeclare,
    RabbitAckAction,
    RabbitMQOptions,
    RetryPolicy,
)
from ingest.rabbitmq.partitions import Partitions, Replica
from ingest.rabbitmq.producer import RabbitMQProducer
from ingest.rabbitmq.publisher import PUBLISHED_AT_HEADER, OutgoingMessage, Publisher
from ingest.rabbitmq.stats import ProducerStats

__all__ = [
    "ATTEMPTS_HEADER",
    "CONNECTION_ERRORS",
    "EXCEPTION_HEADER",
    "FAILED_AT_HEADER",
    "PUBLISHED_AT_HEADER",
    "QUEUE_HEADER",
    "REASON_HEADER",
    "Backoff",
    "Binding",
    "ChannelAcknowledger",
    "Delivery",
    "OutgoingMessage",
    "Partitions",
    "ProducerStats",
    "PublishError",
    "PublishSpan",
    "PublishTracer",
    "Publisher",
    "QueueDeclare",
    "RabbitAckAction",
    "RabbitMQOptions",
    "RabbitMQProducer",
    "Replica",
    "RetryPolicy",
    "Unroutable",
    "client_name",
    "frame_events",
    "open_connection",
    "redact",
    "retry_queue_name",
]
