"""Fleet: the workers of `ingest run --workers N` as one service — their live figures
merged into one snapshot (the page's, summed per pipeline, with each worker's health) and
their metrics into one scrape where each sample carries its `worker` label.

Why a label rather than prometheus_client's multiprocess mode: that mode sums what the
processes write to files, and only for the metric types it knows; the collectors read at
scrape time (queue depths, in flight, pipeline state, open windows) cannot be written
there, gauges lose their per-process meaning (a `livesum` of `ingest_broker_connected`
hides the one worker that is not consuming), and its directory must be emptied at every
start. Each worker keeps its own registry; the supervisor adds `worker="i"` and
Prometheus sums (`sum without (worker) (...)`) when the service as a whole is wanted."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ingest.service.activity import FAILURES_KEPT, HISTORY_S

# Worst first: the merged pipeline shows the worst of its workers.
STATES = ("failed", "restarting", "stopping", "new", "stopped", "running")
CIRCUITS = ("open", "half-open", "closed", None)
BUSIEST_KEPT = 5
_NONE: Counter[str] = Counter()


@dataclass
class WorkerView:
    """What the supervisor knows of worker `index` at one moment: its process (`pid`,
    `exit_code` once it exited), where it serves (`port`, on the loopback), and its
    snapshot, or why there is none (`error`). `answered`: it answered at least once (a
    worker that never did is starting)."""

    index: int
    pid: int | None
    port: int
    exit_code: int | None = None
    snapshot: dict[str, Any] | None = None
    error: str | None = None
    answered: bool = False

    def not_ready(self) -> str | None:
        """Why the worker is not ready, or None when every pipeline of it is."""
        if self.exit_code is not None:
            return f"exited with code {self.exit_code}"
        if self.snapshot is None:
            state = "not answering" if self.answered else "starting"
            return f"{state}: {self.error}" if self.error else state
        pipelines: dict[str, Any] = self.snapshot.get("pipelines", {})
        if not pipelines:
            return "no pipeline"
        reasons = [
            f"{name}: {view.get('not_ready') or 'not ready'}"
            for name, view in pipelines.items()
            if not view.get("ready")
        ]
        return "; ".join(reasons) or None

    def health(self) -> str:
        """`ready`, `not ready`, `starting`, `down` (not answering) or `exited`."""
        if self.exit_code is not None:
            return "exited"
        if self.snapshot is None:
            return "down" if self.answered else "starting"
        return "ready" if self.not_ready() is None else "not ready"

    def describe(self) -> dict[str, Any]:
        """The worker in the merged snapshot's `workers`: its health and its own figures
        per pipeline (over the 15 minutes of history)."""
        pipelines = (self.snapshot or {}).get("pipelines", {})
        figures = {
            name: {
                **{key: sum(series) for key, series in view["rates"].items()},
                "in_flight": view["in_flight"],
                "state": view["state"],
                "paused": view["paused"],
            }
            for name, view in pipelines.items()
        }
        not_ready = self.not_ready()
        return {
            "index": self.index,
            "pid": self.pid,
            "port": self.port,
            "health": self.health(),
            "ready": not_ready is None,
            "not_ready": not_ready,
            "figures": figures,
        }


def readiness(views: Sequence[WorkerView]) -> tuple[bool, dict[str, Any]]:
    """Whether every worker is ready, and `/readyz`'s body: each worker's readiness by
    index, and why those that are not."""
    reasons = {str(view.index): view.not_ready() for view in views}
    body: dict[str, Any] = {"ready": {index: why is None for index, why in reasons.items()}}
    problems = {index: why for index, why in reasons.items() if why is not None}
    if problems:
        body["not_ready"] = problems
    return bool(views) and not problems, body


# -- snapshots ----------------------------------------------------------------------------


def merge_snapshots(views: Sequence[WorkerView], now: float | None = None) -> dict[str, Any]:
    """One snapshot of the shape `activity.snapshot` makes (the page reads it unchanged),
    from the workers that answered: counts summed per pipeline, the worst state shown,
    plus `workers` (`WorkerView.describe`). The uploads and their forms are worker 0's (it
    takes the uploads), else the first answering worker's: they share the spool."""
    answering = [(view.index, view.snapshot) for view in views if view.snapshot is not None]
    names: dict[str, None] = {}  # in order of appearance
    for _, snapshot in answering:
        names.update(dict.fromkeys(snapshot.get("pipelines", {})))
    pipelines = {
        name: merge_pipeline(
            [(i, s["pipelines"][name]) for i, s in answering if name in s["pipelines"]]
        )
        for name in names
    }
    merged: dict[str, Any] = {
        "time": time.time() if now is None else now,
        "history_s": HISTORY_S,
        "pipelines": pipelines,
    }
    first = next((s for i, s in answering if i == 0), answering[0][1] if answering else None)
    if first is not None:
        for key in ("uploads", "upload_forms"):
            if key in first:
                merged[key] = first[key]
    merged["workers"] = [view.describe() for view in views]
    return merged


def merge_pipeline(views: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """One pipeline's figures over the workers that run it (`(worker index, view)`)."""
    all_ = [view for _, view in views]
    first = all_[0]
    not_ready = [f"worker {i}: {v['not_ready'] or 'not ready'}" for i, v in views if not v["ready"]]
    return {
        "state": min((v["state"] for v in all_), key=_rank(STATES)),
        "ready": not not_ready,
        "not_ready": "; ".join(not_ready) or None,
        "paused": any(v["paused"] for v in all_),
        "holds": sorted({hold for v in all_ for hold in v["holds"]}),
        "circuit": min((v["circuit"] for v in all_), key=_rank(CIRCUITS)),
        "restarts": sum(v["restarts"] for v in all_),
        "in_flight": sum(v["in_flight"] for v in all_),
        "prefetch": _sum_or_none(v["prefetch"] for v in all_),
        "close_early_at": _sum_or_none(v["close_early_at"] for v in all_),
        "consumers_ready": [up for v in all_ for up in v["consumers_ready"]],
        # The same declaration in every worker: one of them says it.
        "topology": first["topology"],
        "busy": _mean_busy([v["busy"] for v in all_]),
        "rates_until": (until := max(v["rates_until"] for v in all_)),
        "rates": merge_rates(all_, until),
        "batches_by_trigger": dict(sum((Counter(v["batches_by_trigger"]) for v in all_), _NONE)),
        "open_batches": merge_open_batches([v["open_batches"] for v in all_]),
        "failures": merge_failures(views),
        "latency_ms": merge_latency([v["latency_ms"] for v in all_]),
        # The broker's queues, which every worker reads alike: not summed.
        "queues": first["queues"],
    }


def merge_rates(views: Sequence[dict[str, Any]], until: int) -> dict[str, list[int]]:
    """The per-second series summed second by second: each worker's aligned on `until`
    (a worker that read its clock a second earlier lacks the newest second: 0 there)."""
    merged: dict[str, list[int]] = {}
    for view in views:
        shift = until - view["rates_until"]
        for series, values in view["rates"].items():
            total = merged.setdefault(series, [0] * len(values))
            aligned = values[shift:] if shift > 0 else values
            for second, value in enumerate(aligned):
                total[second] += value
    return merged


def merge_open_batches(views: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per batcher: batches in memory summed over the workers, their busiest keys merged;
    durable windows (`stored`) are the database's, which every worker reads alike: one
    worker's reading, not summed."""
    merged: dict[str, Any] = {}
    for view in views:
        for batcher, open_ in view.items():
            known = merged.get(batcher)
            if known is None:
                merged[batcher] = dict(open_)
            elif not open_.get("stored"):
                known["batches"] += open_["batches"]
                known["messages"] += open_["messages"]
                ages = [a for a in (known["oldest_s"], open_["oldest_s"]) if a is not None]
                known["oldest_s"] = max(ages) if ages else None
                busiest = sorted([*known["busiest"], *open_["busiest"]], key=lambda b: -b[1])
                known["busiest"] = busiest[:BUSIEST_KEPT]
    return merged


def merge_failures(views: Sequence[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The latest failures of every worker, newest first, each naming its worker."""
    failures = [{**f, "worker": index} for index, view in views for f in view["failures"]]
    failures.sort(key=lambda f: -float(f.get("time") or 0))
    return failures[:FAILURES_KEPT]


def merge_latency(views: Sequence[Mapping[str, float] | None]) -> dict[str, float] | None:
    """Percentiles do not add up: the slowest worker's of each (an upper bound for the
    service), the largest, and the samples of all."""
    present = [view for view in views if view]
    if not present:
        return None
    merged = {key: max(view[key] for view in present) for key in ("p50", "p90", "p99", "max")}
    merged["samples"] = sum(view["samples"] for view in present)
    return merged


def _mean_busy(views: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How busy the stages were, as a share of every worker's time: the mean."""
    count = len(views)
    batchers: dict[str, float] = {}
    for view in views:
        for name, share in view["batchers"].items():
            batchers[name] = batchers.get(name, 0.0) + share / count
    return {
        "processors": round(sum(view["processors"] for view in views) / count, 3),
        "batchers": {name: round(share, 3) for name, share in batchers.items()},
    }


def _sum_or_none(values: Iterable[int | None]) -> int | None:
    present = [value for value in values if value is not None]
    return sum(present) if present else None


def _rank(order: Sequence[Any]) -> Any:
    def rank(value: Any) -> int:
        return order.index(value) if value in order else len(order)

    return rank


# -- metrics ------------------------------------------------------------------------------


def merge_metrics(texts: Mapping[int, str | None]) -> list[Metric]:
    """Each worker's scrape (Prometheus text; None: it did not answer) as one set of
    families: every sample labelled `worker="<index>"`, each family once, and
    `ingest_worker_up{worker}` (1 when the worker answered, 0 when not)."""
    up = Metric("ingest_worker_up", "1 while the worker answers the supervisor's scrape", "gauge")
    families: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        worker = str(index)
        up.add_sample("ingest_worker_up", {"worker": worker}, 0.0 if text is None else 1.0)
        for family in text_string_to_metric_families(text or ""):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples.extend(
                sample._replace(labels={**sample.labels, "worker": worker})
                for sample in family.samples
            )
    return [up, *families.values()]


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def exposition(families: Sequence[Metric]) -> bytes:
    """`families` in the Prometheus text format (prometheus_client's own writer)."""
    return generate_latest(_Families(families))
