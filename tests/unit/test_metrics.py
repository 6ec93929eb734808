"""The service's metrics read what the engine and the connector count: supervision per
pipeline, and the RabbitMQ fast path's frame counters."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest

from ingest import Handlers, InMemoryProducer, Message, Pipeline
from ingest.rabbitmq import _fastpath as fastpath
from ingest.service.metrics import Metrics


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
    monkeypatch.setattr(fastpath, "counts", fastpath.Counts(leniently_decoded=3))
    metrics = Metrics()
    assert sample(metrics, 'ingest_frame_events_total{event="leniently_decoded"}') == 3
    assert sample(metrics, 'ingest_frame_events_total{event="unknown_consumer"}') == 0
