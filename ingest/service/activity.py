"""Activity: what the service's live view shows of each pipeline, kept on the server so
that a view opened late still has the history.

`Activity` follows one pipeline's events: messages received, succeeded and failed per
second over the last 15 minutes, batches by what closed them, the last 50 failures, and
publish-to-ack latency over the last minute (of the messages stamped by a Publisher).
`snapshot()` puts that together with its open batches (per batcher: how many, the age of
the oldest, the busiest keys), the pipeline's state (running, paused, circuit,
restarts, in flight against the prefetch and where open batches close early, readiness,
each consumer's connection), its topology and its queues' depths: the JSON of
`GET /api/snapshot` and of each `GET /events` message.

What it keeps of the input is bounded (message ids here, reasons by `Failed`; see
ingest.text), so that the snapshot, sent once a second to every open page, stays small
whatever arrives."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

from ingest.events import Event, EventKind
from ingest.pipeline import Pipeline
from ingest.producer import ConsumingProducer
from ingest.rabbitmq.publisher import published_times
from ingest.text import bounded

HISTORY_S = 15 * 60
FAILURES_KEPT = 50
LATENCY_WINDOW_S = 60
LATENCY_SAMPLES_KEPT = 10_000
BUSY_WINDOW_S = 5
OBSERVED: frozenset[EventKind] = frozenset(
    ("processor.start", "processor.stop", "ack", "batch.stop", "window.flush")
)


class Activity:
    def __init__(self, pipeline: Pipeline, clock: Callable[[], float] = time.time) -> None:
        self.pipeline = pipeline
        self.clock = clock
        producer = pipeline.producer
        # Asked once: a producer fed by connections shows each one's state (else none).
        self._consuming = producer if isinstance(producer, ConsumingProducer) else None
        # One [second, received, successful, failed] per second that saw any.
        self._seconds: deque[list[int]] = deque()
        self.triggers: Counter[str] = Counter()
        self.failures: deque[dict[str, Any]] = deque(maxlen=FAILURES_KEPT)
        # (when acknowledged, milliseconds since published)
        self._latencies: deque[tuple[float, float]] = deque(maxlen=LATENCY_SAMPLES_KEPT)
        # Per stage group (":processors", or a batcher's name for its batch processors):
        # [second, seconds of work that ended in it], the last BUSY_WINDOW_S seconds.
        self._work: dict[str, deque[list[float]]] = {}
        pipeline.events.subscribe(self.on_event, kinds=OBSERVED)

    def on_event(self, event: Event) -> None:
        if event.kind == "processor.start":
            self._count(0, len(event.messages))
        elif event.kind == "ack":
            self._count(1, event.successful)
            self._count(2, event.failed)
            if event.failed:
                self._keep_failures(event)
            self._keep_latencies(event)
        elif event.kind == "processor.stop":
            self._count_work(":processors", event.duration or 0.0)
        elif event.kind == "window.flush":
            # A durable window's messages were acknowledged when stored: only what
            # failed for good is news (retries are in the metrics).
            if event.reason == "dead_letter":
                self._keep_failures(event)
        elif event.batch_info is not None:  # batch.stop
            self.triggers[event.batch_info.trigger] += 1
            self._count_work(event.batch_info.batcher, event.duration or 0.0)

    def consumers_ready(self) -> list[bool]:
        """Each consumer's state (connected and consuming); none for a file."""
        return self._consuming.consumers_ready if self._consuming is not None else []

    def busy(self) -> dict[str, Any]:
        """How busy the stages were over the last BUSY_WINDOW_S seconds: the share of
        their workers' time spent on chunks (`processors`) and on batches (`batchers`:
        each batcher's batch processors), from 0 to 1."""
        topology = self.pipeline.topology()
        start = int(self.clock()) - BUSY_WINDOW_S + 1

        def share(key: str, workers: int) -> float:
            seconds = sum(w for second, w in self._work.get(key, ()) if second >= start)
            return round(min(1.0, seconds / (BUSY_WINDOW_S * workers)), 3)

        return {
            "processors": share(":processors", topology.processors.concurrency),
            "batchers": {g.name: share(g.name, g.concurrency) for g in topology.batchers},
        }

    def _count_work(self, group: str, seconds: float) -> None:
        second = int(self.clock())
        work = self._work.setdefault(group, deque())
        if not work or work[-1][0] != second:
            work.append([second, 0.0])
            while work[0][0] < second - BUSY_WINDOW_S:
                work.popleft()
        work[-1][1] += seconds

    def rates(self, until: int | None = None) -> dict[str, list[int]]:
        """Per second over the HISTORY_S seconds before `until` (now: the current second,
        still counting, left out), oldest first."""
        now = int(self.clock()) if until is None else until
        start = now - HISTORY_S
        series = {
            "received": [0] * HISTORY_S,
            "successful": [0] * HISTORY_S,
            "failed": [0] * HISTORY_S,
        }
        for second, received, successful, failed in self._seconds:
            if start <= second < now:
                index = second - start
                series["received"][index] = received
                series["successful"][index] = successful
                series["failed"][index] = failed
        return series

    def _count(self, column: int, count: int) -> None:
        if not count:
            return
        second = int(self.clock())
        seconds = self._seconds
        if not seconds or seconds[-1][0] != second:
            seconds.append([second, 0, 0, 0])
            while seconds[0][0] <= second - HISTORY_S:
                seconds.popleft()
        seconds[-1][column + 1] += count

    def latency(self) -> dict[str, float] | None:
        """Publish-to-ack milliseconds over the last LATENCY_WINDOW_S: percentiles 50,
        90 and 99, the largest, and how many samples; None without samples."""
        since = self.clock() - LATENCY_WINDOW_S
        values = sorted(ms for when, ms in self._latencies if when >= since)
        if not values:
            return None
        last = len(values) - 1

        def percentile(share: float) -> float:
            return round(values[round(share * last)], 1)

        return {
            "p50": percentile(0.5),
            "p90": percentile(0.9),
            "p99": percentile(0.99),
            "max": round(values[-1], 1),
            "samples": len(values),
        }

    def _keep_latencies(self, event: Event) -> None:
        now = self.clock()
        for published in published_times(event.messages):
            self._latencies.append((now, (now - published) * 1000))

    def _keep_failures(self, event: Event) -> None:
        when = self.clock()
        for message in event.messages:
            if not message.is_ok:
                self.failures.append(
                    {
                        "time": when,
                        "message_id": _text(message.metadata.get("message_id")),
                        "reason": message.failure_reason,  # bounded by `Failed`
                        "stage": event.stage,
                    }
                )


def snapshot(
    activities: Mapping[str, Activity],
    not_ready: Mapping[str, Callable[[], str | None]],
    prefetch: Mapping[str, int | None],
    queues: Mapping[tuple[str, str], int],
) -> dict[str, Any]:
    """Every pipeline's live figures, as JSON."""
    pipelines: dict[str, Any] = {}
    for name, activity in activities.items():
        pipeline = activity.pipeline
        pipelines[name] = {
            "state": pipeline.state,
            "ready": not_ready[name]() is None,
            # A failed pipeline's reason may quote an exception's message, hence input.
            "not_ready": _text(not_ready[name]()),
            "paused": pipeline.paused,
            "holds": sorted(pipeline.holds),
            "circuit": pipeline.circuit_state,
            "restarts": pipeline.crashes,
            "in_flight": pipeline.in_flight,
            "prefetch": prefetch.get(name),
            "close_early_at": pipeline.close_early_at,
            "consumers_ready": activity.consumers_ready(),
            "topology": dataclasses.asdict(pipeline.topology()),
            "busy": activity.busy(),
            "rates_until": (until := int(activity.clock())),
            "rates": activity.rates(until),
            "batches_by_trigger": dict(activity.triggers),
            "open_batches": pipeline.open_batches(),
            "failures": list(activity.failures)[::-1],  # newest first
            "latency_ms": activity.latency(),
            "queues": {q: n for (p, q), n in sorted(queues.items()) if p == name},
        }
    return {"time": time.time(), "history_s": HISTORY_S, "pipelines": pipelines}


def _text(value: Any) -> str | None:
    """`value` as a bounded text (bytes decoded), None kept."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return bounded(value.decode("utf-8", "backslashreplace"))
    return bounded(str(value))


def delta(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """`current` as a change to `previous` (both `snapshot`s), for a reader that has
    `previous` (`GET /events` after its first message): a pipeline's per-second history
    only from `previous`'s end (`rates_shift` seconds: the reader drops as many of its
    oldest and appends these), its failures only when they changed (a service of two
    pipelines: 3.0 KB a second, where the whole snapshot is 19.2 KB)."""
    pipelines: dict[str, Any] = {}
    for name, now in current["pipelines"].items():
        before = previous["pipelines"].get(name)
        if before is None:
            pipelines[name] = now
            continue
        shift = now["rates_until"] - before["rates_until"]
        changed = dict(now)
        if 0 <= shift < HISTORY_S:
            changed["rates"] = {
                series: values[len(values) - shift :] for series, values in now["rates"].items()
            }
            changed["rates_shift"] = shift
        if now["failures"] == before["failures"]:
            del changed["failures"]
        pipelines[name] = changed
    return {**current, "delta": True, "pipelines": pipelines}
