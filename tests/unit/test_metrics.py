"""The service's metrics read what the engine and the connector count: supervision per
pipeline, and the RabbitMQ fast path's frame counters."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ingest import Handlers, InMemoryProducer, Message, Pipeline, Processors
from ingest.rabbitmq import PUBLISHED_AT_HEADER
from ingest.rabbitmq._aiormq import events
from ingest.service.metrics import ChunkedHistogram, Metrics
from ingest.testing import send_batch


class Passes(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message


def sample(metrics: Metrics, line_start: str) -> float:
    text = generate_latest(metrics.registry).decode()
    [line] = [line for line in text.splitlines() if line.startswith(line_start + " ")]
    return float(line.rsplit(" ", 1)[1])


async def test_the_state_and_restarts_of_a_pipeline_are_gauges_read_when_scraped() -> None:
    metrics = Metrics()
    pipeline = Pipeline("p", Passes(), InMemoryProducer())
    metrics.watch(pipeline, lambda: True)
    assert sample(metrics, 'ingest_pipeline_state{pipeline="p",state="new"}') == 1
    await pipeline.start()
    assert sample(metrics, 'ingest_pipeline_state{pipeline="p",state="running"}') == 1
    assert sample(metrics, 'ingest_pipeline_state{pipeline="p",state="new"}') == 0
    assert sample(metrics, 'ingest_pipeline_restarts_total{pipeline="p"}') == 0
    await pipeline.stop()
    assert sample(metrics, 'ingest_pipeline_state{pipeline="p",state="stopped"}') == 1


def test_the_fast_paths_frame_counters_are_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "counts", events.Counts(leniently_decoded=3))
    metrics = Metrics()
    assert sample(metrics, 'ingest_frame_events_total{event="leniently_decoded"}') == 3
    assert sample(metrics, 'ingest_frame_events_total{event="unknown_consumer"}') == 0


async def test_handle_message_durations_are_observed_per_chunk_without_per_message_events() -> None:
    metrics = Metrics()
    pipeline = Pipeline("p", Passes(), InMemoryProducer(), processors=Processors(max_demand=10))
    metrics.watch(pipeline, lambda: True)
    assert not pipeline.events.per_message  # the metrics want no per-message events
    async with pipeline:
        await send_batch(pipeline, range(25))
    assert sample(metrics, 'ingest_handle_message_seconds_count{pipeline="p"}') == 25
    assert sample(metrics, 'ingest_handle_message_seconds_bucket{le="+Inf",pipeline="p"}') == 25
    assert sample(metrics, 'ingest_handle_message_seconds_sum{pipeline="p"}') < 1.0


def test_a_chunked_histogram_counts_each_value_in_its_bucket() -> None:
    histogram = ChunkedHistogram("h_seconds", "test", (0.1, 1.0))
    histogram.observe_many("p", [0.05, 0.1, 0.5, 2.0])
    registry = CollectorRegistry()
    registry.register(histogram)
    text = generate_latest(registry).decode()
    assert 'h_seconds_bucket{le="0.1",pipeline="p"} 2.0' in text
    assert 'h_seconds_bucket{le="1.0",pipeline="p"} 3.0' in text
    assert 'h_seconds_bucket{le="+Inf",pipeline="p"} 4.0' in text
    assert 'h_seconds_sum{pipeline="p"} 2.65' in text


async def test_publish_to_ack_seconds_are_observed_from_the_stamped_messages() -> None:
    metrics = Metrics()
    pipeline = Pipeline("p", Passes(), InMemoryProducer())
    metrics.watch(pipeline, lambda: True, prefetch=40)
    two_seconds_ago = int((time.time() - 2) * 1000)
    async with pipeline:
        await send_batch(
            pipeline, ["stamped"], metadata={"headers": {PUBLISHED_AT_HEADER: two_seconds_ago}}
        )
        await send_batch(pipeline, ["not stamped"], metadata={"headers": {"other": 1}})
        await send_batch(pipeline, ["a bool"], metadata={"headers": {PUBLISHED_AT_HEADER: True}})
    assert sample(metrics, 'ingest_publish_to_ack_seconds_count{pipeline="p"}') == 1
    assert 2.0 <= sample(metrics, 'ingest_publish_to_ack_seconds_sum{pipeline="p"}') < 3.0
    assert sample(metrics, 'ingest_publish_to_ack_seconds_bucket{le="1.0",pipeline="p"}') == 0
    assert sample(metrics, 'ingest_prefetch_messages{pipeline="p"}') == 40
