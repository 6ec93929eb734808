"""Declaration: a hosted pipeline declared as one value (Broadway's `start_link` keyword
list), and the wiring it stands for, done once: the file-or-queue choice, the consumer's
RabbitMQOptions from the settings, the circuit breaker (on a queue only), the queue names,
the connection names."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, Unpack

from ingest.handlers import Handlers
from ingest.options import Batcher, Processors
from ingest.pipeline import Pipeline
from ingest.producer import Producer
from ingest.producers.csv_file import CsvFileProducer
from ingest.rabbitmq.connection import client_name
from ingest.rabbitmq.options import RabbitMQOptions, RetryPolicy
from ingest.rabbitmq.producer import RabbitMQProducer
from ingest.rabbitmq.publisher import Publisher
from ingest.service import tracing
from ingest.service.hosted import Hooks, HostedPipeline
from ingest.service.settings import PipelineSettings, Settings
from ingest.typing import PartitionBy

S = TypeVar("S", bound=PipelineSettings)

# The metadata a hosted pipeline's consumer keeps: its id (idempotent sinks), whether it
# is a redelivery, and its headers (the publish time some carry: the live page's
# publish-to-ack latency; a partition key).
METADATA = ("message_id", "redelivered", "headers")


@dataclass(frozen=True)
class Declaration(Generic[S]):
    """A hosted pipeline's defaults; the settings (`INGEST_PIPELINES__<NAME>__...`, read
    with `settings`, a PipelineSettings subclass for options of its own) change them::

        ORDERS = Declaration(
            "orders",
            queue="orders_queue",
            settings=OrderSettings,
            processors=Processors(concurrency=2, max_demand=50),
            batchers={"default": Batcher(batch_size=50, batch_timeout=1.0)},
            retry=RetryPolicy(max_attempts=5, delays=(1.0, 5.0)),
            handler_timeout=10.0,
        )

        @ORDERS.factory
        def build(settings: Settings, *, source: Path | None = None) -> HostedPipeline:
            wiring = ORDERS.wire(settings, source)
            handlers = OrderHandlers(...)  # the pipeline's resources
            return wiring.host(wiring.pipeline(handlers), startup=..., shutdown=...)

    `prefetch_count` is the default when the settings give none (None: one that lets a
    batch of every batcher fill, `PipelineShape.default_bound`)."""

    name: str
    queue: str
    settings: type[S]
    processors: Processors = field(default_factory=Processors)
    batchers: Mapping[str, Batcher] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    prefetch_count: int | None = None
    handler_timeout: float | None = None
    metadata: tuple[str, ...] = METADATA

    def config(self, settings: Settings) -> S:
        """This pipeline's settings, as its model reads them."""
        config = settings.pipeline(self.name)
        if isinstance(config, self.settings):
            return config
        return self.settings.model_validate(config.model_dump(exclude_unset=True))

    def queue_of(self, settings: Settings) -> str:
        """The queue consumed: the settings' (`__QUEUE`), else the declared one."""
        return self.config(settings).queue or self.queue

    def wire(
        self,
        settings: Settings,
        source: Path | None = None,
        *,
        prefetch_count: int | None = None,
        consumer: Callable[[RabbitMQOptions], RabbitMQOptions] | None = None,
    ) -> Wiring[S]:
        """The producer for these settings (`source`: that file, else the queue) and
        what builds the rest. `prefetch_count` replaces the declared default; `consumer`
        changes the consumer's options (e.g. `Partitions.consumer_options`)."""
        config = self.config(settings)
        if source is not None:
            return Wiring(self, settings, config, source, CsvFileProducer(source), None)
        queue = config.queue or self.queue
        options = RabbitMQOptions(
            queue=queue,
            declare=config.queue_declare(queue),
            url=settings.amqp_url.get_secret_value(),
            connection_name=client_name(f"ingest-{self.name}"),
            prefetch_count=config.prefetch_count or prefetch_count or self.prefetch_count,
            retry=config.retry_policy(self.retry),
            metadata=self.metadata,
        )
        options = consumer(options) if consumer else options
        return Wiring(self, settings, config, None, RabbitMQProducer(options), options)

    def factory(self, build: Callable[..., HostedPipeline]) -> DeclaredFactory:
        """`build` as the `ingest.pipelines` entry point takes it, declaring this
        pipeline's settings model (so that `Settings()` reads and checks them)."""
        return DeclaredFactory(build, self.settings)


@dataclass(frozen=True)
class DeclaredFactory:
    """A pipeline factory that declares its settings model (hosted.DeclaresSettings)."""

    build: Callable[..., HostedPipeline]
    settings_model: type[PipelineSettings]

    def __call__(self, settings: Settings, *, source: Path | None = None) -> HostedPipeline:
        return self.build(settings, source=source)


@dataclass(frozen=True)
class Wiring(Generic[S]):
    """A declaration applied to the settings: its producer (`from_queue`: a broker's,
    consuming with `options`; else a file's, `options` None), and what builds its
    pipelines, publishers and hosted pipeline."""

    declaration: Declaration[S]
    settings: Settings
    config: S
    source: Path | None
    producer: Producer
    options: RabbitMQOptions | None

    @property
    def from_queue(self) -> bool:
        return self.source is None

    @property
    def queue(self) -> str:
        return self.config.queue or self.declaration.queue

    @property
    def url(self) -> str:
        return self.settings.amqp_url.get_secret_value()

    def batchers(self, defaults: Mapping[str, Batcher] | None = None) -> dict[str, Batcher]:
        """`defaults` (else the declared batchers) with the settings applied."""
        return self.config.batcher_options(dict(defaults or self.declaration.batchers))

    def concurrency(self, batchers: Mapping[str, Batcher] | None = None) -> int:
        """How many of the pipeline's hooks may run at once, as the settings make it: its
        processors and the batch processors of `batchers` (as `batchers()` gives them;
        else the declared ones). A pool of connections the hooks share, of this size,
        never makes one wait, nor opens and closes extra ones under load."""
        processors = self.config.processor_options(self.declaration.processors)
        chosen = self.batchers() if batchers is None else batchers
        return processors.concurrency + sum(b.concurrency for b in chosen.values())

    def pipeline(
        self,
        handlers: Handlers,
        producer: Producer | None = None,
        *,
        name: str | None = None,
        batchers: Mapping[str, Batcher] | None = None,
        partition_by: PartitionBy | None = None,
    ) -> Pipeline:
        """The pipeline over the wired producer, or over `producer` (e.g. an uploaded
        file's: `name` then tells it apart). `batchers` are taken as they are (see
        `batchers()`). The circuit breaker guards the queue's pipeline only: a file's
        rows have nowhere to wait while a dependency is down."""
        declaration, settings, config = self.declaration, self.settings, self.config
        guarded = producer is None and self.from_queue
        return Pipeline(
            name or declaration.name,
            handlers,
            producer or self.producer,
            processors=config.processor_options(declaration.processors),
            batchers=batchers if batchers is not None else self.batchers(),
            circuit_breaker=config.circuit_breaker_options() if guarded else None,
            partition_by=partition_by,
            shutdown_timeout=settings.shutdown_timeout,
            handler_timeout=declaration.handler_timeout,
        )

    def publisher(self, role: str, **options: Any) -> Publisher:
        """A publisher of this pipeline's, its connection named after it and `role`."""
        name = client_name(f"ingest-{self.declaration.name}-{role}")
        options.setdefault("tracer", tracing.publish_tracer())
        return Publisher(self.url, connection_name=name, **options)

    def host(self, pipeline: Pipeline, **hooks: Unpack[Hooks]) -> HostedPipeline:
        return HostedPipeline.of(pipeline, self.queue, **hooks)
