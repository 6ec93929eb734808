"""The workers of `ingest run --workers N` as one service (ingest.service.fleet): their
snapshots merged into the page's shape, summed per pipeline with each worker's health;
their scrapes merged into one with a `worker` label and each family once; readiness that
names the worker that is not ready and why. No broker: real pipelines on the in-memory
producer, and real prometheus_client registries."""

from __future__ import annotations

import copy
import json
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ingest import Batcher
from ingest.service.activity import FAILURES_KEPT, HISTORY_S, Activity, delta, snapshot
from ingest.service.fleet import (
    WorkerView,
    exposition,
    merge_latency,
    merge_metrics,
    merge_open_batches,
    merge_rates,
    merge_snapshots,
    readiness,
)
from ingest.testing import push_messages

from .conftest import MakePipeline
from .test_activity import Some


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def worker_snapshot(make_pipeline: MakePipeline, data: list[str]) -> dict[str, Any]:
    """A worker's `/api/snapshot` after `data` went through its pipeline `test`."""
    pipeline = await make_pipeline(Some(), batchers={"b": Batcher(batch_size=2)})
    clock = Clock()
    activity = Activity(pipeline, clock)
    await (await push_messages(pipeline, data)).wait()
    clock.now += 1  # the current second is left out of the history: it is past now
    made = snapshot({"test": activity}, {"test": lambda: None}, {"test": 10}, {})
    # Through JSON, as the supervisor reads it.
    return {**json.loads(json.dumps(made)), "uploads": [], "upload_forms": {}}


def view(index: int, snap: dict[str, Any] | None, **fields: Any) -> WorkerView:
    return WorkerView(index, 1000 + index, 9000 + index, snapshot=snap, answered=True, **fields)


async def test_the_merged_snapshot_sums_the_workers_counts_per_pipeline(
    make_pipeline: MakePipeline,
) -> None:
    first = await worker_snapshot(make_pipeline, ["a", "b", "bad"])
    second = await worker_snapshot(make_pipeline, ["c", "d", "e", "f"])
    merged = merge_snapshots([view(0, first), view(1, second)])
    test = merged["pipelines"]["test"]
    assert sum(test["rates"]["received"]) == 7
    assert (sum(test["rates"]["successful"]), sum(test["rates"]["failed"])) == (6, 1)
    assert len(test["rates"]["received"]) == HISTORY_S
    assert test["prefetch"] == 20  # each worker's own prefetch
    assert test["ready"] is True
    assert test["state"] == "running"
    assert [f["worker"] for f in test["failures"]] == [0]
    assert [w["health"] for w in merged["workers"]] == ["ready", "ready"]
    assert merged["workers"][1]["figures"]["test"]["received"] == 4
    # The same keys as one process's snapshot (the page reads both), plus the workers.
    assert set(merged) == {*first, "workers"}
    assert set(test) == set(first["pipelines"]["test"])


async def test_a_change_of_the_merged_snapshot_is_a_delta_as_of_one_process(
    make_pipeline: MakePipeline,
) -> None:
    one = await worker_snapshot(make_pipeline, ["a"])
    before = merge_snapshots([view(0, one)])
    later = copy.deepcopy(one)
    later["pipelines"]["test"]["rates_until"] += 1
    change = delta(before, merge_snapshots([view(0, later)]))
    assert change["pipelines"]["test"]["rates_shift"] == 1
    assert change["workers"][0]["health"] == "ready"


def test_series_read_a_second_apart_are_aligned_on_the_newest_second() -> None:
    early = {"rates_until": 99, "rates": {"received": [1, 2, 3]}}
    late = {"rates_until": 100, "rates": {"received": [10, 20, 30]}}
    # `early` covers the seconds 96..98, `late` 97..99.
    assert merge_rates([early, late], 100) == {"received": [12, 23, 30]}


def test_latency_is_the_slowest_workers_and_the_samples_of_all() -> None:
    fast = {"p50": 1.0, "p90": 2.0, "p99": 3.0, "max": 4.0, "samples": 10}
    slow = {"p50": 5.0, "p90": 6.0, "p99": 7.0, "max": 8.0, "samples": 5}
    assert merge_latency([fast, None, slow]) == {**slow, "samples": 15}
    assert merge_latency([None, None]) is None


def test_open_batches_in_memory_add_up_and_durable_windows_are_read_once() -> None:
    memory = {"batches": 2, "messages": 5, "oldest_s": 1.0, "busiest": [["a", 3], ["b", 2]]}
    other = {"batches": 1, "messages": 4, "oldest_s": 2.5, "busiest": [["c", 4]]}
    stored = {"batches": 7, "messages": 9, "oldest_s": 3.0, "busiest": [], "stored": True}
    merged = merge_open_batches(
        [{"cinema": memory, "email": stored}, {"cinema": other, "email": stored}]
    )
    assert merged["cinema"]["batches"] == 3
    assert merged["cinema"]["messages"] == 9
    assert merged["cinema"]["oldest_s"] == 2.5
    assert merged["cinema"]["busiest"] == [["c", 4], ["a", 3], ["b", 2]]
    assert merged["email"] == stored  # the database's windows, which both read


async def test_the_worst_state_and_every_hold_show_on_the_merged_pipeline(
    make_pipeline: MakePipeline,
) -> None:
    running = await worker_snapshot(make_pipeline, ["a"])
    paused = copy.deepcopy(running)
    test = paused["pipelines"]["test"]
    test.update(paused=True, holds=["paused"], ready=False, not_ready="paused")
    test.update(state="restarting", circuit="open")
    merged = merge_snapshots([view(0, running), view(1, paused)])["pipelines"]["test"]
    assert (merged["state"], merged["circuit"], merged["paused"]) == ("restarting", "open", True)
    assert merged["holds"] == ["paused"]
    assert merged["not_ready"] == "worker 1: paused"


async def test_failures_are_merged_newest_first_and_bounded(make_pipeline: MakePipeline) -> None:
    one = await worker_snapshot(make_pipeline, ["bad"] * 3)
    other = copy.deepcopy(one)
    for n, failure in enumerate(other["pipelines"]["test"]["failures"]):
        failure["time"] += 100 + n
    many = copy.deepcopy(one)
    many["pipelines"]["test"]["failures"] *= FAILURES_KEPT
    merged = merge_snapshots([view(0, one), view(1, other), view(2, many)])
    failures = merged["pipelines"]["test"]["failures"]
    assert len(failures) == FAILURES_KEPT
    assert [f["worker"] for f in failures[:3]] == [1, 1, 1]
    assert failures == sorted(failures, key=lambda f: -f["time"])


async def test_a_worker_down_or_exited_is_named_with_why_and_its_figures_left_out(
    make_pipeline: MakePipeline,
) -> None:
    up = await worker_snapshot(make_pipeline, ["a", "b"])
    views = [
        view(0, up),
        view(1, None, error="Connection refused"),
        view(2, None, exit_code=-9),
        WorkerView(3, 1003, 9003, error="Connection refused"),  # never answered yet
    ]
    merged = merge_snapshots(views)
    assert sum(merged["pipelines"]["test"]["rates"]["received"]) == 2
    workers = {w["index"]: w for w in merged["workers"]}
    assert [workers[i]["health"] for i in range(4)] == ["ready", "down", "exited", "starting"]
    assert workers[2]["not_ready"] == "exited with code -9"
    ready, body = readiness(views)
    assert not ready
    assert body["ready"] == {"0": True, "1": False, "2": False, "3": False}
    assert body["not_ready"] == {
        "1": "not answering: Connection refused",
        "2": "exited with code -9",
        "3": "starting: Connection refused",
    }


async def test_readiness_names_the_worker_whose_pipeline_is_not_ready(
    make_pipeline: MakePipeline,
) -> None:
    up = await worker_snapshot(make_pipeline, [])
    paused = copy.deepcopy(up)
    paused["pipelines"]["test"].update(ready=False, not_ready="paused")
    assert readiness([view(0, up), view(1, up)]) == (True, {"ready": {"0": True, "1": True}})
    ready, body = readiness([view(0, up), view(1, paused)])
    assert (ready, body["not_ready"]) == (False, {"1": "test: paused"})
    assert readiness([])[0] is False


def test_the_uploads_are_worker_zeros_which_takes_them() -> None:
    empty = {"time": 0, "history_s": HISTORY_S, "pipelines": {}}
    zero = {**empty, "uploads": [{"id": "from-0"}], "upload_forms": {"x": {}}}
    one = {**empty, "uploads": [{"id": "from-1"}], "upload_forms": {}}
    assert merge_snapshots([view(1, one), view(0, zero)])["uploads"] == [{"id": "from-0"}]
    assert merge_snapshots([view(1, one), view(0, None)])["uploads"] == [{"id": "from-1"}]


def worker_scrape(received: int, connected: float) -> str:
    registry = CollectorRegistry()
    Counter("ingest_messages_received", "Messages", ["pipeline"], registry=registry).labels(
        "bookings"
    ).inc(received)
    Gauge("ingest_broker_connected", "1 while", ["pipeline"], registry=registry).labels(
        "bookings"
    ).set(connected)
    Histogram(
        "ingest_batch_size", "Sizes", ["pipeline"], buckets=(1, 10), registry=registry
    ).labels("bookings").observe(5)
    return generate_latest(registry).decode()


def test_one_scrape_has_each_family_once_with_a_worker_label_on_every_sample() -> None:
    text = exposition(
        merge_metrics({0: worker_scrape(3, 1.0), 1: worker_scrape(4, 0.0), 2: None})
    ).decode()
    for family in ("ingest_messages_received_total", "ingest_broker_connected"):
        assert text.count(f"# TYPE {family} ") == 1, text
        assert text.count(f"# HELP {family} ") == 1, text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    received = {
        s.labels["worker"]: s.value
        for s in families["ingest_messages_received"].samples
        if s.name.endswith("_total")
    }
    assert received == {"0": 3.0, "1": 4.0}
    connected = {s.labels["worker"]: s.value for s in families["ingest_broker_connected"].samples}
    assert connected == {"0": 1.0, "1": 0.0}
    up = {s.labels["worker"]: s.value for s in families["ingest_worker_up"].samples}
    assert up == {"0": 1.0, "1": 1.0, "2": 0.0}
    buckets = [s for s in families["ingest_batch_size"].samples if s.name.endswith("_bucket")]
    assert {(s.labels["worker"], s.labels["le"]) for s in buckets} >= {("0", "10.0"), ("1", "+Inf")}
    assert all("worker" in s.labels for f in families.values() for s in f.samples)
