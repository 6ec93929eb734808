"""Every query of the Grafana dashboard (config/grafana/dashboards/ingest.json) runs on a
real Prometheus — Debian's binary, configured from config/prometheus/prometheus.yml and
alerts.yml — that scraped the tickets service and RabbitMQ's rabbitmq_prometheus plugin
while bookings (a few failing), notifications (one failing) and an upload went through:
Prometheus accepts each, and each returns data. Grafana's variables are resolved as
Grafana does: `label_values(...)` asked of Prometheus, every value selected."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiormq
import pytest
import pytest_asyncio
import yaml

from tests.integration.service import RunningService, local_service, metric
from tests.integration.uploads import TOKEN, bookings_csv, finished, upload
from tests.support import Broker, eventually, free_port, port_open, publish
from tests.unit.test_grafana_dashboard import (
    LABEL_VALUES,
    PROMETHEUS_FILE,
    expand,
    load_dashboard,
    query_panels,
    regex_of,
)

ALERTS_FILE = PROMETHEUS_FILE.with_name("alerts.yml")
SCRAPE_INTERVAL_S = 1
RABBITMQ_PROMETHEUS_PORT = 15692

BOOKINGS = [f"{event},{user}" for event in ("cinema", "musical", "opera") for user in (1, 2, 3)]
FAILING_BOOKINGS = ["not a booking", "cinema,999"]  # dead-lettered: bad payload, unknown user
FAILING_NOTIFICATION = "nonsense"  # dead-lettered: not `type,recipient`

PROMETHEUS = shutil.which("prometheus")


class Prometheus:
    """A Prometheus server of its own, in `directory`, and its HTTP API."""

    def __init__(self, binary: str, directory: Path, config: Mapping[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (directory / "prometheus.yml").write_text(yaml.safe_dump(dict(config)))
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def logs(self) -> str:
        return self.log.read_text()[-3000:]

    def ready(self) -> bool:
        assert self.process.poll() is None, f"prometheus exited:\n{self.logs()}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def scrape_errors(self) -> list[str]:
        """The targets not up, with why (none once each was scraped)."""
        targets = self.api("targets", state="active")["data"]["activeTargets"]
        return [
            f"{t['scrapeUrl']}: {t['health']} {t['lastError']}"
            for t in targets
            if t["health"] != "up"
        ]

    def api(self, path: str, **params: str | float) -> dict[str, Any]:
        """GET /api/v1/<path>: the answer, refused ones (status "error") included."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as error:  # 400, 422: the body says why
            answer = json.loads(error.read())
        return answer

    def series(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        answer = self.api("query_range", query=expr, start=start, end=end, step=SCRAPE_INTERVAL_S)
        assert answer["status"] == "success", f"{expr}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of an instant query now, None when it has none."""
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        result = answer["data"]["result"]
        return float(result[0]["value"][1]) if result else None


@dataclass(frozen=True)
class Scraped:
    """What the tests query: the Prometheus that scraped the load, over [start, end], and
    the dashboard's variables with what Grafana would put in their place."""

    prometheus: Prometheus
    start: float
    end: float
    variables: dict[str, list[str]]

    @property
    def builtins(self) -> dict[str, str]:
        # Grafana's $__rate_interval: max($__interval + scrape interval, 4 scrape intervals).
        step = SCRAPE_INTERVAL_S
        return {
            "__interval": f"{step}s",
            "__rate_interval": f"{max(step + SCRAPE_INTERVAL_S, 4 * SCRAPE_INTERVAL_S)}s",
            "__range": f"{math.ceil(self.end - self.start)}s",
        }

    def expand(self, expr: str) -> str:
        chosen = {name: regex_of(values) for name, values in self.variables.items()}
        return expand(expr, chosen, self.builtins)


def prometheus_config(service_port: int, rabbitmq_host: str) -> dict[str, Any]:
    """config/prometheus/prometheus.yml as shipped (paths, jobs, rules), pointed at the
    service and broker under test and scraping every second."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_FILE.read_text())
    interval = f"{SCRAPE_INTERVAL_S}s"
    config["global"] = {
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "evaluation_interval": interval,
    }
    config["rule_files"] = [str(ALERTS_FILE)]
    targets = {
        "ingest:8000": f"127.0.0.1:{service_port}",
        f"rabbitmq:{RABBITMQ_PROMETHEUS_PORT}": f"{rabbitmq_host}:{RABBITMQ_PROMETHEUS_PORT}",
    }
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [targets[target] for target in static["targets"]]
    return config


async def _until(check: Callable[[], object], timeout: float = 30) -> None:
    """`eventually` for a blocking check (an HTTP call to Prometheus), in a thread: the
    service under test answers Prometheus' scrapes in this event loop meanwhile."""

    async def holds() -> bool:
        return bool(await asyncio.to_thread(check))

    await eventually(holds, timeout=timeout)


async def _load(
    running: RunningService, prometheus: Prometheus, channel: aiormq.abc.AbstractChannel, name: str
) -> None:
    """Bookings (a few failing) and a failing notification; once Prometheus has scraped
    their batches, more bookings and an upload of 20 rows (a rate needs a counter to grow
    between two scrapes: the first batches only create their series). Returns once the
    service has settled them all."""
    bookings, notifications = f"{name}-bookings", f"{name}-notifications"
    waves = [BOOKINGS + FAILING_BOOKINGS, BOOKINGS * 2]
    published = 0
    for wave in waves:
        for payload in wave:
            await publish(channel, bookings, payload.encode(), message_id=f"grafana-{published}")
            published += 1
        if wave is waves[0]:
            await publish(channel, notifications, FAILING_NOTIFICATION.encode(), message_id="n")
            await _settled(running, published)
            await _until(lambda: prometheus.value("sum(ingest_batches_total)") is not None)
    status, answer = await upload(running, bookings_csv(20))
    assert status == 202, answer
    assert (await finished(running, answer["id"]))["state"] == "done"
    await _settled(running, published)


async def _settled(running: RunningService, bookings: int) -> None:
    """Until the service has acknowledged `bookings` bookings, and mailed the digests."""

    async def settled() -> bool:
        _, text = await running.get_async("/metrics")
        acked = sum(
            metric(text, "ingest_acks_total", pipeline="bookings", action=action)
            for action in ("ack", "dead_letter")
        )
        flushed = metric(
            text,
            "ingest_window_flushes_total",
            pipeline="notifications",
            batcher="email",
            outcome="done",
        )
        open_windows = metric(
            text, "ingest_open_windows", pipeline="notifications", batcher="email"
        )
        return acked == bookings and flushed > 0 and open_windows == 0

    await eventually(settled, timeout=30)


async def _scraped_after_the_load(
    prometheus: Prometheus, running: RunningService, name: str
) -> None:
    """Until Prometheus holds the service's final figures, and the broker's for the test's
    queues (RabbitMQ refreshes them every 5 s)."""
    _, text = await running.get_async("/metrics")
    processed = sum(
        metric(text, "ingest_messages_processed_total", pipeline=pipeline, status=status)
        for pipeline in ("bookings", "notifications")
        for status in ("successful", "failed")
    )
    await _until(lambda: prometheus.value("sum(ingest_messages_processed_total)") == processed)
    acked = f'rabbitmq_channel_messages_acked_total{{queue=~"{name}-.+"}}'
    await _until(lambda: (prometheus.value(f"count({acked} > 0)") or 0) >= 2)
    await asyncio.sleep(3 * SCRAPE_INTERVAL_S)  # a few more samples, for the rates


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scraped(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Scraped]:
    """The service run and loaded under a Prometheus scraping it and the broker; stopped
    once Prometheus has it all. Prometheus runs until the module's tests are done."""
    if PROMETHEUS is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("needs the prometheus binary (Debian's prometheus package)")
    rabbitmq_host = urllib.parse.urlsplit(broker.management_url).hostname or "127.0.0.1"
    if not port_open(rabbitmq_host, RABBITMQ_PROMETHEUS_PORT):
        pytest.fail(
            f"RabbitMQ's metrics do not answer on {rabbitmq_host}:{RABBITMQ_PROMETHEUS_PORT}: "
            "the dashboard needs the rabbitmq_prometheus plugin "
            "(rabbitmq-plugins enable rabbitmq_prometheus)"
        )
    directory = tmp_path_factory.mktemp("grafana")
    name = f"test-{uuid.uuid4().hex[:12]}"
    connection = await aiormq.connect(broker.amqp_url)
    prometheus: Prometheus | None = None
    try:
        channel = await connection.channel()
        async with local_service(
            broker,
            name,
            directory,
            admin_token=TOKEN,
            upload_dir=directory / "uploads",
            queue_depth_interval=0.5,
            # Digest windows open long enough for a scrape to see them.
            pipelines={"notifications": {"batchers": {"email": {"batch_timeout": 2.5}}}},
        ) as running:
            prometheus = Prometheus(
                PROMETHEUS, directory, prometheus_config(running.settings.http_port, rabbitmq_host)
            )
            await _until(prometheus.ready)
            try:
                await _until(lambda: not prometheus.scrape_errors(), timeout=15)
            except AssertionError:
                raise AssertionError(f"cannot scrape: {prometheus.scrape_errors()}") from None
            # The dead-letter queues empty, twice, before anything fails: the dead letters'
            # alert needs a rise to see.
            dlq = f'ingest_queue_messages{{queue="{name}-bookings.dlq"}}'
            await _until(lambda: (prometheus.value(f"count_over_time({dlq}[1m])") or 0) >= 2)
            start = time.time() - SCRAPE_INTERVAL_S
            await _load(running, prometheus, channel, name)
            await _scraped_after_the_load(prometheus, running, name)
            end = time.time()
        yield Scraped(prometheus, start, end, _variables(prometheus, start, end))
    finally:
        if prometheus is not None:
            prometheus.stop()
        await _delete_queues(broker, connection, name)
        await connection.close()


def _variables(prometheus: Prometheus, start: float, end: float) -> dict[str, list[str]]:
    """Each template variable's values, asked of Prometheus in the dashboard's order (a
    variable's query may use the ones before it), every value selected ("All")."""
    values: dict[str, list[str]] = {}
    for variable in load_dashboard()["templating"]["list"]:
        match = LABEL_VALUES.match(variable["query"])
        assert match, variable["query"]
        selector = expand(match["selector"], {n: regex_of(v) for n, v in values.items()}, {})
        params: dict[str, str | float] = {"match[]": selector, "start": start, "end": end}
        answer = prometheus.api(f"label/{match['label']}/values", **params)
        assert answer["status"] == "success", answer
        values[variable["name"]] = sorted(answer["data"])
    return values


async def _delete_queues(
    broker: Broker, connection: aiormq.abc.AbstractConnection, name: str
) -> None:
    channel = await connection.channel()
    for queue in await broker.api_async("GET", "queues/%2F?columns=name"):
        if queue["name"].startswith(name):
            await channel.queue_delete(queue["name"])


def _panels() -> list[Any]:
    return [pytest.param(panel, id=panel["title"]) for panel in query_panels(load_dashboard())]


def test_the_variables_resolve_to_the_pipelines_and_their_queues(scraped: Scraped) -> None:
    assert scraped.variables["pipeline"] == ["bookings", "notifications"]
    queues = scraped.variables["queue"]
    assert any(q.endswith("-bookings") for q in queues)
    assert any(q.endswith("-notifications.dlq") for q in queues)


@pytest.mark.parametrize("panel", _panels())
def test_every_query_of_the_panel_is_accepted_and_returns_data(
    scraped: Scraped, panel: Mapping[str, Any]
) -> None:
    problems = []
    for target in panel["targets"]:
        expr = scraped.expand(target["expr"])
        answer = scraped.prometheus.api(
            "query_range", query=expr, start=scraped.start, end=scraped.end, step=SCRAPE_INTERVAL_S
        )
        if answer["status"] != "success":
            problems.append(f"{target['refId']}: refused: {answer.get('error')}\n    {expr}")
            continue
        values = [
            float(value) for series in answer["data"]["result"] for _, value in series["values"]
        ]
        if not any(math.isfinite(v) for v in values):
            problems.append(f"{target['refId']}: no data\n    {expr}")
    assert not problems, "\n".join(problems)


def test_the_alert_annotation_is_accepted_and_alerts_carry_its_labels(scraped: Scraped) -> None:
    """The annotation shows firing alerts; in the test's minute none fires (each waits its
    `for`), but the dead letters' alert is pending, with the labels the annotation shows."""
    [annotation] = [a for a in load_dashboard()["annotations"]["list"] if "expr" in a]
    scraped.prometheus.series(annotation["expr"], scraped.start, scraped.end)
    pending = scraped.prometheus.series(
        'ALERTS{alertname="IngestDeadLettersGrowing", alertstate="pending"}',
        scraped.start,
        scraped.end,
    )
    queues = {series["metric"]["queue"] for series in pending}
    assert any(q.endswith("-bookings.dlq") for q in queues), pending
    shown = f"{annotation['titleFormat']} {annotation['textFormat']} {annotation['tagKeys']}"
    for series in pending:
        for label in ("alertname", "severity", "pipeline", "queue"):
            assert label in series["metric"]
            assert label in shown
