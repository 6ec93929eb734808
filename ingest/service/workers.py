"""Workers: `ingest run --workers N` runs N service processes that compete for the same
queues, behind one HTTP address served by their supervisor, and stops them all together."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from ingest.exceptions import StartupError
from ingest.service.settings import Settings

if TYPE_CHECKING:
    from ingest.service.fleet_http import Fleet, FleetServer

logger = structlog.get_logger("ingest.service.workers")

WORKER_ENV = "INGEST_WORKER"  # set to worker i's index in its environment
WORKER_HOST = "127.0.0.1"  # where the workers serve: only their supervisor calls them


def worker_index() -> int | None:
    """This process's index among the workers of `ingest run --workers N`, or None when it
    is not one of them."""
    value = os.environ.get(WORKER_ENV, "")
    return int(value) if value.isdigit() else None


def supervise(workers: int, arguments: Sequence[str], settings: Settings) -> int:
    """Serve the service's HTTP address (`INGEST_HTTP_HOST:INGEST_HTTP_PORT`:
    ingest.service.fleet_http) and start `workers` copies of `ingest run <arguments>`,
    worker i being replica i of `workers` and serving HTTP on a private loopback port;
    forward SIGTERM/SIGINT to them, and wait for all. If one exits on its own, the others
    are stopped too. The exit code is the first non-zero one (in the workers' order), else
    0; StartupError when the address cannot be served (no worker started)."""
    return asyncio.run(_supervise(workers, arguments, settings))


async def _supervise(workers: int, arguments: Sequence[str], settings: Settings) -> int:
    # Imported here: the workers import this module (worker_index) and need no client.
    from ingest.service.fleet_http import Fleet, Member

    fleet = Fleet()
    server = await _serve(settings, fleet)
    await fleet.start()
    children = _Children()
    stop = asyncio.Event()

    def on_signal() -> None:
        stop.set()
        children.terminate()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        for index, port in enumerate(_free_ports(workers)):
            if stop.is_set():  # a signal came while the first workers were starting
                break
            # In a process group of its own: a Ctrl-C on the terminal reaches the supervisor
            # alone, which tells each worker once (`_Children.terminate`).
            child = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "ingest", "run", *arguments),
                env=_env(index, workers, port),
                process_group=0,
            )
            children.append(child)
            fleet.members.append(Member(index, port, child))
        logger.info("workers started", workers=workers, pids=[c.pid for c in children])
        await _watch(children, stop)
    finally:
        children.terminate()  # on the way out of an error too
        await asyncio.gather(*(child.wait() for child in children))
        # Until every worker is gone, a signal is the supervisor's, never Python's default.
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop()
        await fleet.close()
    codes = [child.returncode for child in children]
    logger.info("workers stopped", exit_codes=codes)
    return next((code for code in codes if code), 0)


async def _serve(settings: Settings, fleet: Fleet) -> FleetServer:
    """The service's address, served: StartupError when it cannot be."""
    from ingest.service.fleet_http import FleetServer
    from ingest.service.protection import Protections

    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    server = FleetServer(
        settings.http_host, settings.http_port, fleet, token, protections=Protections.of(settings)
    )
    try:
        await server.start()
    except OSError as exc:
        await server.stop()
        raise StartupError(
            f"cannot serve HTTP on {settings.http_host}:{settings.http_port}: {exc.strerror or exc}"
        ) from exc
    return server


async def _watch(children: _Children, stop: asyncio.Event) -> None:
    """Until the stop or a worker's exit; then every worker is told to stop, and waited
    for."""
    async with asyncio.TaskGroup() as group:
        exits = [
            group.create_task(child.wait(), name=f"worker {i}") for i, child in enumerate(children)
        ]
        stopped = group.create_task(stop.wait(), name="stop")
        await asyncio.wait([*exits, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            gone = [(i, c.returncode) for i, c in enumerate(children) if c.returncode is not None]
            logger.warning("a worker exited; stopping the others", exited=gone)
            stop.set()
        children.terminate()


class _Children(list[asyncio.subprocess.Process]):
    """The worker processes, each told to stop (`terminate`) at most once: a worker puts
    back the default SIGTERM handler while it drains, so a second SIGTERM would kill it
    mid-drain (exit code -15)."""

    def __init__(self) -> None:
        super().__init__()
        self._terminated: set[int] = set()

    def terminate(self) -> None:
        """SIGTERM to each worker still running and not told yet."""
        for child in self:
            if child.returncode is None and child.pid not in self._terminated:
                self._terminated.add(child.pid)
                with contextlib.suppress(ProcessLookupError):  # exited, not reaped yet
                    child.send_signal(signal.SIGTERM)


def _env(index: int, workers: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env[WORKER_ENV] = str(index)
    # The workers are the replicas that share a partitioned pipeline's partitions.
    env["INGEST_REPLICA_INDEX"], env["INGEST_REPLICAS"] = str(index), str(workers)
    # Their supervisor is their only client, on the loopback, whatever the service's
    # address and allowed hosts are.
    env["INGEST_HTTP_HOST"], env["INGEST_HTTP_PORT"] = WORKER_HOST, str(port)
    env["INGEST_HTTP_ALLOWED_HOSTS"] = WORKER_HOST
    return env


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports free on the loopback now (held together while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((WORKER_HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
