"""Metrics: Prometheus counters and histograms fed by pipeline events, and gauges read
from the pipelines when scraped."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ingest.events import Event, EventKind
from ingest.pipeline import CircuitState, Pipeline, State
from ingest.producer import Counters
from ingest.rabbitmq import frame_events
from ingest.rabbitmq.publisher import published_times
from ingest.rabbitmq.stats import ProducerStats

# The *_created samples only clutter the text format here.
disable_created_metrics()  # type: ignore[no-untyped-call]

# The `hook` label of ingest_hook_exceptions_total, per event kind.
_HOOK_OF: dict[EventKind, str] = {
    "processor.exception": "processor",
    "message.exception": "message",
    "batch.exception": "batch",
    "ack.exception": "ack",
    "handle_failed.exception": "handle_failed",
}
_OBSERVED: frozenset[EventKind] = frozenset(
    (
        "processor.start",
        "processor.stop",
        "ack",
        "batch.stop",
        "window.flush",
        "window.exception",
        *_HOOK_OF,
    )
)
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SIZES = (1, 2, 5, 10, 20, 50, 75, 100, 200, 500, 1000)
# Publish to ack spans a batch's timeout, a durable window, a backlog: up to minutes.
_LATENCIES = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class Watched:
    """What the scrape-time gauges read of one pipeline."""

    pipeline: Pipeline
    ready: Callable[[], bool]
    stats: Counters | None
    prefetch: int | None = None


class Metrics:
    """The service's metrics, in their own registry (so tests can build several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "ingest_messages_received",
            "Messages that entered the processors",
            ["pipeline"],
            registry=r,
        )
        self.processed = Counter(
            "ingest_messages_processed",
            "Messages acknowledged after their last stage, by outcome",
            ["pipeline", "status"],
            registry=r,
        )
        self.batches = Counter(
            "ingest_batches", "Batches handled", ["pipeline", "batcher", "trigger"], registry=r
        )
        self._add_timings(r)
        self.hook_errors = Counter(
            "ingest_hook_exceptions", "Exceptions raised by hooks", ["pipeline", "hook"], registry=r
        )
        self.window_flushes = Counter(
            "ingest_window_flushes",
            "Durable windows flushed, by outcome: done, retry (tried again later), "
            "dead_letter (their failed messages dead-lettered)",
            ["pipeline", "batcher", "outcome"],
            registry=r,
        )
        self.window_store_errors = Counter(
            "ingest_window_store_errors",
            "Calls to a durable batcher's window store that failed, by operation (append, "
            "close, claim, open_windows, dead_letter)",
            ["pipeline", "operation"],
            registry=r,
        )
        self._watched: dict[str, Watched] = {}
        r.register(_PipelineCollector(self._watched))
        r.register(_SupervisionCollector(self._watched))
        r.register(_WindowsCollector(self._watched))
        r.register(_FrameCollector())

    def _add_timings(self, r: CollectorRegistry) -> None:
        """The histograms: batch sizes, the hooks' durations, publish to ack."""
        self.batch_size = Histogram(
            "ingest_batch_size",
            "Messages per batch",
            ["pipeline", "batcher"],
            buckets=_SIZES,
            registry=r,
        )
        self.handle_message = ChunkedHistogram(
            "ingest_handle_message_seconds", "handle_message duration", _SECONDS
        )
        r.register(self.handle_message)
        self.handle_batch = Histogram(
            "ingest_handle_batch_seconds",
            "handle_batch duration",
            ["pipeline", "batcher"],
            buckets=_SECONDS,
            registry=r,
        )
        self.publish_to_ack = Histogram(
            "ingest_publish_to_ack_seconds",
            "Seconds from publish to acknowledgement, of the messages a Publisher stamped "
            "with its publish time (a sample: at most one every 10 ms per publisher)",
            ["pipeline"],
            buckets=_LATENCIES,
            registry=r,
        )

    def watch(
        self,
        pipeline: Pipeline,
        ready: Callable[[], bool],
        stats: Counters | None = None,
        prefetch: int | None = None,
    ) -> None:
        """Subscribe to `pipeline`'s events and report its gauges and producer stats
        (`prefetch`: the unacknowledged messages its consumers may hold)."""
        self._watched[pipeline.name] = Watched(pipeline, ready, stats, prefetch)
        # Not the per-message events: handle_message's durations come per chunk.
        pipeline.events.subscribe(self._on_event, kinds=_OBSERVED)

    def _on_event(self, event: Event) -> None:
        kind, name = event.kind, event.pipeline
        if kind == "processor.stop":
            self.handle_message.observe_many(name, event.durations)
        elif kind == "processor.start":
            self.received.labels(name).inc(len(event.messages))
        elif kind == "ack":
            now = time.time()
            for published in published_times(event.messages):
                self.publish_to_ack.labels(name).observe(max(0.0, now - published))
            if event.successful:
                self.processed.labels(name, "successful").inc(event.successful)
            if event.failed:
                self.processed.labels(name, "failed").inc(event.failed)
        elif kind == "batch.stop" and event.batch_info is not None:
            info = event.batch_info
            self.batches.labels(name, info.batcher, info.trigger).inc()
            self.batch_size.labels(name, info.batcher).observe(info.size)
            self.handle_batch.labels(name, info.batcher).observe(event.duration or 0.0)
        elif kind == "window.flush" and event.batch_info is not None:
            outcome = event.reason or "done"
            self.window_flushes.labels(name, event.batch_info.batcher, outcome).inc()
        elif kind == "window.exception":
            self.window_store_errors.labels(name, event.reason or "unknown").inc()
        elif kind in _HOOK_OF:
            self.hook_errors.labels(name, _HOOK_OF[kind]).inc()


class _PipelineCollector(Collector):
    """Gauges and producer counters read at scrape time: nothing on the hot path."""

    def __init__(self, watched: Mapping[str, Watched]) -> None:
        self._watched = watched

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "ingest_in_flight_messages", "Received and not yet acknowledged", labels=["pipeline"]
        )
        connected = GaugeMetricFamily(
            "ingest_broker_connected", "1 while connected and consuming", labels=["pipeline"]
        )
        prefetch = GaugeMetricFamily(
            "ingest_prefetch_messages",
            "Unacknowledged messages the pipeline's consumers may hold (the prefetch count, "
            "summed over its consumers): in flight can reach it, never pass it",
            labels=["pipeline"],
        )
        acks = CounterMetricFamily(
            "ingest_acks",
            "Acknowledgements sent to the broker, by action",
            labels=["pipeline", "action"],
        )
        producer = CounterMetricFamily(
            "ingest_producer_events",
            "Producer events: connection_losses, reconnects, dropped_stale, multiple_ack_frames, "
            "single_ack_frames",
            labels=["pipeline", "event"],
        )
        for name, watched in self._watched.items():
            in_flight.add_metric([name], watched.pipeline.in_flight)
            connected.add_metric([name], 1.0 if watched.ready() else 0.0)
            if watched.prefetch is not None:
                prefetch.add_metric([name], watched.prefetch)
            # A producer without stats (a file) still shows its (zero) acknowledgements.
            stats: Counters = watched.stats or ProducerStats()
            for action, value in stats.acknowledgements().items():
                acks.add_metric([name, action], value)
            if watched.stats is not None:
                for event, value in stats.events().items():
                    producer.add_metric([name, event], value)
        yield from (in_flight, connected, prefetch, acks, producer)


class _SupervisionCollector(Collector):
    """What each pipeline's supervisor reports: crashes (each restarts the pipeline, but
    the last when it failed) and the state, read at scrape time."""

    STATES: tuple[State, ...] = get_args(State)
    CIRCUIT_STATES: tuple[CircuitState, ...] = ("closed", "half-open", "open")

    def __init__(self, watched: Mapping[str, Watched]) -> None:
        self._watched = watched

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "ingest_pipeline_restarts",
            "Crashes of a pipeline stage, each followed by a restart of the pipeline",
            labels=["pipeline"],
        )
        states = GaugeMetricFamily(
            "ingest_pipeline_state",
            "1 for the state the pipeline is in (running, restarting, failed, ...)",
            labels=["pipeline", "state"],
        )
        paused = GaugeMetricFamily(
            "ingest_pipeline_paused",
            "1 while an operator has paused the pipeline (ingest pause, POST .../pause)",
            labels=["pipeline"],
        )
        circuits = GaugeMetricFamily(
            "ingest_circuit_state",
            "The pipeline's circuit breaker: 0 closed, 1 half-open, 2 open",
            labels=["pipeline"],
        )
        for name, watched in self._watched.items():
            pipeline = watched.pipeline
            restarts.add_metric([name], pipeline.crashes)
            if pipeline.circuit_state is not None:
                circuits.add_metric([name], self.CIRCUIT_STATES.index(pipeline.circuit_state))
            for state in self.STATES:
                states.add_metric([name, state], 1.0 if pipeline.state == state else 0.0)
            paused.add_metric([name], 1.0 if pipeline.paused else 0.0)
        yield from (restarts, states, paused, circuits)


class _WindowsCollector(Collector):
    """Each batcher's open windows (batches) at scrape time: how many, their messages,
    the age of the oldest and, for durable windows, the closed ones waiting for a flush.
    Durable windows are read from their store at most once a second by the pipeline."""

    def __init__(self, watched: Mapping[str, Watched]) -> None:
        self._watched = watched

    def collect(self) -> Iterator[Metric]:
        labels = ["pipeline", "batcher"]
        windows = GaugeMetricFamily(
            "ingest_open_windows", "Open batches (windows), one per batch key", labels=labels
        )
        messages = GaugeMetricFamily(
            "ingest_open_window_messages", "Messages in open batches (windows)", labels=labels
        )
        oldest = GaugeMetricFamily(
            "ingest_oldest_open_window_seconds",
            "Age of the oldest open batch (window); absent when none is open",
            labels=labels,
        )
        closed = GaugeMetricFamily(
            "ingest_windows_awaiting_flush",
            "Durable windows closed (due) and not yet flushed",
            labels=labels,
        )
        for name, watched in self._watched.items():
            for batcher, view in watched.pipeline.open_batches().items():
                windows.add_metric([name, batcher], view["batches"])
                messages.add_metric([name, batcher], view["messages"])
                if view["oldest_s"] is not None:
                    oldest.add_metric([name, batcher], view["oldest_s"])
                if view.get("stored"):
                    closed.add_metric([name, batcher], view["closed"])
        yield from (windows, messages, oldest, closed)


class UploadRows(Collector):
    """`ingest_upload_rows_total{pipeline,outcome}`: the rows of uploaded files settled so
    far, by outcome (`successful`, `failed`), read at scrape time from `rows` (the service's
    `Uploads.rows`), so the upload at work counts as it goes."""

    def __init__(self, rows: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        self._rows = rows

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "ingest_upload_rows",
            "Rows of uploaded files settled, by outcome (successful, failed)",
            labels=["pipeline", "outcome"],
        )
        for (pipeline, outcome), value in sorted(self._rows().items()):
            family.add_metric([pipeline, outcome], value)
        yield family


class _FrameCollector(Collector):
    """The RabbitMQ fast path's counters, process-wide: deliveries whose strings were not
    UTF-8 (decoded leniently), whose headers nothing could decode (rejected), or for a
    consumer the channel does not know (dropped)."""

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "ingest_frame_events",
            "RabbitMQ frames: leniently_decoded, undecodable_rejected, unknown_consumer",
            labels=["event"],
        )
        for event, value in frame_events().items():
            family.add_metric([event], value)
        yield family


class ChunkedHistogram(Collector):
    """A histogram per pipeline fed a chunk of observations at once (one per message of a
    chunk): a bisect and an increment per value into plain counts, where a
    `prometheus_client.Histogram` takes a lock and walks its buckets for each. Read at
    scrape time, in the event loop's thread, which is the only one that writes."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(buckets)
        # Per pipeline: a count per bucket (the last is +Inf) and the sum.
        self._series: dict[str, tuple[list[int], list[float]]] = {}

    def observe_many(self, pipeline: str, values: Sequence[float]) -> None:
        if not values:
            return
        series = self._series.get(pipeline)
        if series is None:
            series = self._series[pipeline] = ([0] * (len(self._bounds) + 1), [0.0])
        counts, total = series
        bounds = self._bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1
        total[0] += sum(values)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=["pipeline"])
        for pipeline, (counts, total) in self._series.items():
            cumulative = list(accumulate(counts))
            buckets = [
                (floatToGoString(bound), count)  # type: ignore[no-untyped-call]
                for bound, count in zip(self._bounds, cumulative, strict=False)
            ]
            buckets.append(("+Inf", cumulative[-1]))
            family.add_metric([pipeline], buckets, total[0])
        yield family
