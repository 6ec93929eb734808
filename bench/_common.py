"""Helpers the RabbitMQ and service benchmarks share: filling and deleting queues, a
database made for a run, peak RSS and process CPU from /proc (RabbitMQ's and PostgreSQL's
too), and the probe that reads them around one drain."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiormq

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM: unlike ru_maxrss, it is not inherited across fork and exec."""
    return _status_mb(pid, "VmHWM:")


def rss_mb(pid: int | str = "self") -> float:
    """VmRSS: the resident set now."""
    return _status_mb(pid, "VmRSS:")


def _status_mb(pid: int | str, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


async def fill_queue(
    url: str,
    queue: str,
    messages: list[tuple[bytes, str]],
    content_type: str | None = None,
    queue_type: str = "classic",
) -> None:
    """Declare `queue` (durable, of `queue_type`, with the arguments the service gives
    such a queue) and publish the (body, message_id) pairs, persistent and confirmed a
    thousand at a time."""
    from ingest.service.settings import PipelineSettings

    declare = PipelineSettings.model_validate({"queue_type": queue_type}).queue_declare(queue)
    connection = await aiormq.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.queue_declare(queue, durable=True, arguments=dict(declare.arguments))
    for start in range(0, len(messages), 1000):
        await asyncio.gather(
            *(
                channel.basic_publish(
                    body,
                    routing_key=queue,
                    properties=aiormq.spec.Basic.Properties(
                        delivery_mode=2, message_id=message_id, content_type=content_type
                    ),
                )
                for body, message_id in messages[start : start + 1000]
            )
        )
    await connection.close()


async def delete_queue(url: str, queue: str) -> None:
    """A queue and the dead-letter and retry queues either pipeline may have made for it."""
    from ingest.rabbitmq.acknowledger import retry_queue_name
    from pipelines import bookings, notifications

    delays = {*bookings.RETRY.delays, *notifications.RETRY.delays}
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    for name in (queue, f"{queue}.dlq", *(retry_queue_name(queue, d) for d in delays)):
        await channel.queue_delete(name)
    await connection.close()


def delete_queues(url: str, queues: list[str]) -> None:
    for queue in queues:
        asyncio.run(delete_queue(url, queue))


async def delete_exchange(url: str, exchange: str) -> None:
    """An exchange a run made (the partitions' consistent-hash exchange)."""
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.exchange_delete(exchange)
    await connection.close()


def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a process, all its threads included (aiosqlite's, asyncpg's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


def machine_jiffies() -> tuple[float, float]:
    """This machine's idle and total CPU time over all its cores since boot, in clock
    ticks (`/proc/stat`): idle counts iowait too, total leaves out guest time (already in
    user)."""
    # user nice system idle iowait irq softirq steal
    cpu = Path("/proc/stat").read_text().split("\n", 1)[0]
    fields = [int(value) for value in cpu.split()[1:9]]
    return float(fields[3] + fields[4]), float(sum(fields))


def loop_schedstat() -> tuple[float, float]:
    """Seconds this process's main thread ran, and waited on the run queue, since it
    started (`/proc/self/schedstat`, nanoseconds)."""
    run, waiting, _ = Path("/proc/self/schedstat").read_text().split()
    return int(run) / 1e9, int(waiting) / 1e9


def find_broker_pid() -> int | None:
    """RabbitMQ's Erlang VM on this machine (`beam.smp` with rabbit on its command line);
    None when the broker runs elsewhere (in a container's own pid namespace, say)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "beam.smp":
                continue
            if b"rabbit" in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:  # a process that ended while we looked
            continue
    return None


def broker_background_pct(pid: int | None, seconds: float = 2.0) -> float | None:
    """RabbitMQ's CPU in % of one core over `seconds` while none of ours runs: what other
    clients (and the tail of a fill) cost it, which its figure for a drain includes."""
    if pid is None:
        return None
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return round((cpu_seconds(pid) - before) * 100 / seconds, 1)


async def _postgres_connect(url: str) -> Any:
    import asyncpg
    from sqlalchemy.engine import make_url

    parts = make_url(url)
    return await asyncpg.connect(
        host=parts.host,
        port=parts.port,
        user=parts.username,
        password=parts.password,
        database=parts.database,
        timeout=5,
    )


async def _postgres_execute(url: str, statement: str) -> None:
    connection = await _postgres_connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def postgres_fetch(url: str, query: str, *arguments: Any) -> list[Any]:
    """The rows of one query on the database of `url`, on a connection of its own."""
    connection = await _postgres_connect(url)
    try:
        return list(await connection.fetch(query, *arguments))
    finally:
        await connection.close()


def postgres_unreachable(url: str) -> str | None:
    """Why PostgreSQL cannot be used at `url`, or None when it can."""
    try:
        asyncio.run(_postgres_execute(url, "SELECT 1"))
    except Exception as exc:
        return f"PostgreSQL unreachable at {url} ({type(exc).__name__}: {exc})"
    return None


@contextlib.contextmanager
def postgres_database(url: str) -> Iterator[str]:
    """The URL of a database made for the run (bench_<random>) on the server of `url`,
    dropped after it with any connection left to it."""
    from sqlalchemy.engine import make_url

    name = f"bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_postgres_execute(url, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_postgres_execute(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def postgres_backends(database_url: str) -> dict[int, float]:
    """CPU seconds of each server process connected to this database (ours excluded)."""
    connection = await _postgres_connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await connection.close()
    return processes_cpu([row["pid"] for row in rows], "postgres")


def processes_cpu(pids: list[int], command: str) -> dict[int, float]:
    """CPU seconds of those of `pids` that run `command` here: none for a server on
    another machine or in a container."""
    found: dict[int, float] = {}
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == command:
                found[pid] = cpu_seconds(pid)
        except OSError:  # ended meanwhile, or not ours to see
            continue
    return found


class Probe:
    """One drain's measures from `start` to `stop` (its last acknowledgement or, for the
    notifications, its last digest mailed; before the teardown): the clock, this
    process's CPU plus its workers', RabbitMQ's, and that of the PostgreSQL backends of
    the bench database (a backend that ended before `stop` is missed: the pipelines'
    pools keep theirs open, so few if any)."""

    def __init__(self, broker_pid: int | None, postgres_url: str | None) -> None:
        self.broker_pid = broker_pid
        self.postgres_url = postgres_url
        self.workers_cpu = 0.0
        self.worker_peaks: list[float] = []
        self.started_at = 0.0
        self.stopped_at: float | None = None
        self._start: dict[str, float] = {}
        self._backends: dict[int, float] = {}
        self._spent: dict[str, float] = {}
        self._steady: list[dict[str, float]] = []  # the counters at 10 % and 90 % settled

    def _counters(self) -> dict[str, float]:
        idle, total = machine_jiffies()
        run, waiting = loop_schedstat()
        counters = {
            "service": cpu_seconds(),
            "machine_idle": idle,
            "machine_total": total,
            "loop_run": run,
            "loop_runqueue": waiting,
        }
        if self.broker_pid is not None:
            counters["broker"] = cpu_seconds(self.broker_pid)
        return counters

    async def start(self) -> None:
        if self.postgres_url:
            self._backends = await postgres_backends(self.postgres_url)
        self._start = self._counters()
        self.started_at = time.perf_counter()

    def settled(self, done: int, count: int) -> None:
        """Told as the drain's messages are settled: the counters once a tenth and once
        nine tenths of them were, the drain's steady part. It leaves out the start (the
        consumer starting, the first batches filling) and the end, where the last batches
        wait for their timeout with the cores idle: a queue with a backlog runs as in the
        steady part for as long as the backlog lasts."""
        marks = (0.1, 0.9)
        if len(self._steady) < len(marks) and done >= marks[len(self._steady)] * count:
            counters = self._counters()
            self._steady.append({**counters, "at": time.perf_counter(), "settled": done})

    async def stop(self) -> None:
        """Idempotent: a drain calls it on its last acknowledgement, the runner after."""
        if self.stopped_at is not None:
            return
        self.stopped_at = time.perf_counter()
        self._spent = {k: v - self._start[k] for k, v in self._counters().items()}
        if self.postgres_url:
            backends = await postgres_backends(self.postgres_url)
            self._spent["postgres"] = sum(
                cpu - self._backends.get(pid, 0.0) for pid, cpu in backends.items()
            )

    def result(self, count: int, extra: dict[str, Any]) -> dict[str, Any]:
        """The figures of the drain; `extra` may replace `seconds` (timed from the first
        delivery instead of the start)."""
        assert self.stopped_at is not None

        def per_message(seconds: float) -> float:
            return round(seconds * 1e6 / count, 1)

        seconds = extra.pop("seconds", self.stopped_at - self.started_at)
        row: dict[str, Any] = {
            "messages": count,
            "seconds": round(seconds, 3),
            "msgs_per_s": round(count / seconds),
            "service_cpu_us_per_msg": per_message(self._spent["service"] + self.workers_cpu),
            "broker_cpu_us_per_msg": per_message(self._spent["broker"])
            if "broker" in self._spent
            else None,
            # With workers, each is a process of its own: the largest is the figure per process.
            "peak_rss_mb": round(max([peak_rss_mb(), *self.worker_peaks]), 1),
        }
        if "postgres" in self._spent:
            row["postgres_cpu_us_per_msg"] = per_message(self._spent["postgres"])
        # Over the probe's own time (start to stop), whatever `seconds` says: the share of
        # every core's time this machine spent idle, and the cores the service kept busy.
        probed = self.stopped_at - self.started_at
        row["machine_idle_pct"] = round(
            100 * self._spent["machine_idle"] / max(self._spent["machine_total"], 1), 1
        )
        row["service_busy_cores"] = round(
            (self._spent["service"] + self.workers_cpu) / max(probed, 1e-9), 2
        )
        # The event loop's thread (this process's main thread; workers, in processes of
        # their own, are not in it): the share of the time it ran, and waited to run (on
        # the kernel's run queue: the cores busy with others). What is left, it waited
        # for I/O with nothing to do.
        if not self.workers_cpu:
            row.update(loop_shares(self._spent, probed))
        return {**row, **self._steady_figures(), **extra}

    def _steady_figures(self) -> dict[str, float]:
        """The rate, machine idle and (one process) the loop's shares between 10 % and 90 %
        settled; none when the drain did not report its progress."""
        if len(self._steady) < 2:
            return {}
        first, last = self._steady
        seconds = last["at"] - first["at"]
        spent = {k: last[k] - first[k] for k in first}
        figures = {
            "steady_msgs_per_s": round(spent["settled"] / seconds),
            "steady_machine_idle_pct": round(
                100 * spent["machine_idle"] / max(spent["machine_total"], 1), 1
            ),
        }
        if not self.workers_cpu:  # the workers' CPU and loops are in their own processes
            figures["steady_service_busy_cores"] = round(spent["service"] / seconds, 2)
            shares = loop_shares(spent, seconds)
            figures.update({f"steady_{name}": share for name, share in shares.items()})
        return figures


def loop_shares(spent: dict[str, float], seconds: float) -> dict[str, float]:
    """The event loop's thread over `seconds`: the share it ran, waited on the kernel's
    run queue for a core, and waited for I/O with nothing to do (the rest)."""
    run = round(100 * spent["loop_run"] / seconds, 1)
    runqueue = round(100 * spent["loop_runqueue"] / seconds, 1)
    return {
        "loop_run_pct": run,
        "loop_runqueue_pct": runqueue,
        "loop_waited_pct": round(max(0.0, 100 - run - runqueue), 1),
    }


@contextlib.asynccontextmanager
async def scratch_database(kind: str, postgres_url: str) -> AsyncIterator[str]:
    """The URL of an empty SQLite file (`kind` "sqlite") or of a PostgreSQL database made
    on the server of `postgres_url`; removed, or dropped, after."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as directory:
            yield f"sqlite+aiosqlite:///{directory}/bench.db"
        return
    from sqlalchemy.engine import make_url

    name = f"bench_{uuid.uuid4().hex[:12]}"
    await _postgres_execute(postgres_url, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await _postgres_execute(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
