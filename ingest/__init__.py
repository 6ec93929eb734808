"""ingest: Broadway-style pipelines for RabbitMQ in asyncio."""

from ingest.acknowledger import AckAction, Acknowledger, NoopAcknowledger
from ingest.batch_info import BatchInfo, BatchTrigger
from ingest.events import Event, EventBus
from ingest.handlers import Handlers
from ingest.message import OK, BatchMode, Failed, Message, Ok, Status
from ingest.options import (
    Batcher,
    CircuitBreaker,
    CustomBatchSize,
    Processors,
    RateLimiting,
    byte_budget,
)
from ingest.pipeline import Pipeline
from ingest.producer import Producer, Sink
from ingest.producers.memory import InMemoryProducer
from ingest.text import bounded
from ingest.topology import StageGroup, Topology
from ingest.waiting import CLOSE_TIMEOUT_S, close_within, first_of

__all__ = [
    "CLOSE_TIMEOUT_S",
    "OK",
    "AckAction",
    "Acknowledger",
    "BatchInfo",
    "BatchMode",
    "BatchTrigger",
    "Batcher",
    "CircuitBreaker",
    "CustomBatchSize",
    "Event",
    "EventBus",
    "Failed",
    "Handlers",
    "InMemoryProducer",
    "Message",
    "NoopAcknowledger",
    "Ok",
    "Pipeline",
    "Processors",
    "Producer",
    "RateLimiting",
    "Sink",
    "StageGroup",
    "Status",
    "Topology",
    "bounded",
    "byte_budget",
    "close_within",
    "first_of",
]
