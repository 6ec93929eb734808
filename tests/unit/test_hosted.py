"""The hosted-pipeline contract: what the service reads of a producer comes from the
producer's capability protocols (any producer, not a list of known classes), and a
declared pipeline is wired from its declaration and the settings (file or queue, the
consumer's options, the circuit breaker)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pydantic import Field

from ingest import Batcher, Handlers, Message, Pipeline, Processors
from ingest.producer import Sink
from ingest.producers import InMemoryProducer
from ingest.producers.csv_file import CsvFileProducer
from ingest.rabbitmq import RabbitMQProducer, RetryPolicy
from ingest.rabbitmq.stats import ProducerStats
from ingest.service.declaration import Declaration
from ingest.service.hosted import HostedPipeline
from ingest.service.settings import PipelineSettings, Settings


class Echo(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        return messages


class OwnBrokerProducer:
    """A producer of no class the service knows, offering every capability."""

    def __init__(self) -> None:
        self.ready = False
        self.consumers_ready = [False, True]
        self.stats = ProducerStats(ack=3)
        self.prefetch = 40
        self.finished = asyncio.Event()

    def work_queues(self) -> list[str]:
        return ["orders"]

    def queues(self) -> list[str]:
        return ["orders", "orders.dlq"]

    async def start(self, sink: Sink) -> None: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


def test_what_a_producer_offers_is_read_off_its_protocols() -> None:
    producer = OwnBrokerProducer()
    hosted = HostedPipeline.of(Pipeline("orders", Echo(), producer), "orders")
    assert hosted.ready() is False
    producer.ready = True
    assert hosted.ready() is True
    assert hosted.stats is producer.stats
    assert (hosted.work_queues, hosted.queues) == (["orders"], ["orders", "orders.dlq"])
    assert hosted.prefetch == 40
    assert hosted.finished is producer.finished


def test_a_producer_offering_nothing_is_always_ready_and_has_no_queues() -> None:
    hosted = HostedPipeline.of(Pipeline("plain", Echo(), InMemoryProducer()), None)
    assert hosted.ready() is True
    assert (hosted.stats, hosted.prefetch, hosted.finished) == (None, None, None)
    assert (hosted.work_queues, hosted.queues) == ([], [])


class OrderSettings(PipelineSettings):
    closed_shops: list[str] = Field(default_factory=list)


ORDERS = Declaration(
    "orders",
    queue="orders_queue",
    settings=OrderSettings,
    processors=Processors(concurrency=3, max_demand=10),
    batchers={"default": Batcher(batch_size=20, batch_timeout=1.0)},
    retry=RetryPolicy(max_attempts=4, delays=(2.0,)),
    prefetch_count=60,
    handler_timeout=5.0,
)


def test_a_declaration_wires_the_queue_from_the_settings() -> None:
    settings = Settings(
        pipelines={"orders": {"queue": "mine", "batchers": {"default": {"batch_size": 10}}}}
    )
    wiring = ORDERS.wire(settings)
    assert isinstance(wiring.producer, RabbitMQProducer)
    options = wiring.producer.options
    assert (options.queue, options.prefetch_count) == ("mine", 60)
    assert options.retry == RetryPolicy(max_attempts=4, delays=(2.0,))
    assert options.dlq_name == "mine.dlq"  # a quorum queue by default
    assert options.connection_name is not None
    assert options.connection_name.startswith("ingest-orders (")
    pipeline = wiring.pipeline(Echo())
    assert pipeline.processors == Processors(concurrency=3, max_demand=10)
    assert pipeline.batchers["default"].batch_size == 10
    assert pipeline.circuit_state == "closed"  # on by default, for a queue
    hosted = wiring.host(pipeline)
    assert (hosted.queue, hosted.work_queues) == ("mine", ["mine"])
    assert hosted.prefetch == 60


def test_a_file_or_another_producer_gets_no_circuit_breaker(tmp_path: Path) -> None:
    source = tmp_path / "orders.csv"
    wiring = ORDERS.wire(Settings(), source)
    assert isinstance(wiring.producer, CsvFileProducer)
    assert wiring.pipeline(Echo()).circuit_state is None
    queued = ORDERS.wire(Settings())
    upload = queued.pipeline(Echo(), CsvFileProducer(source), name="orders-upload")
    assert (upload.name, upload.circuit_state) == ("orders-upload", None)


def test_a_pipeline_reads_its_own_settings_with_its_model() -> None:
    settings = Settings(pipelines={"orders": {"prefetch_count": 80}})
    config = ORDERS.config(settings)  # "orders" is not installed: read again with its model
    assert isinstance(config, OrderSettings)
    assert (config.prefetch_count, config.closed_shops) == (80, [])


def test_a_factory_declares_its_settings_model() -> None:
    def build(settings: Settings, *, source: Path | None = None) -> HostedPipeline:
        wiring = ORDERS.wire(settings, source)
        return wiring.host(wiring.pipeline(Echo()))

    factory = ORDERS.factory(build)
    assert factory.settings_model is OrderSettings
    assert factory(Settings()).pipeline.name == "orders"
