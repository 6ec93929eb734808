"""Workers: `ingest run --workers N` runs N service processes that compete for the same
queues, and stops them all together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

import structlog

logger = structlog.get_logger("ingest.service.workers")


def supervise(workers: int, arguments: Sequence[str], http_port: int) -> int:
    """Start `workers` copies of `ingest run <arguments>` (worker i serves HTTP on
    `http_port + i` and is replica i of `workers`), forward SIGTERM/SIGINT to them, and
    wait for all. If one exits on its own, the others are stopped too. The exit code is
    the first non-zero one, else 0."""
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(signum: int, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(workers):
            if stopping:  # a signal came while the first workers were starting
                break
            env = dict(os.environ)
            env["INGEST_WORKER"] = str(index)
            # The workers are the replicas that share a partitioned pipeline's partitions.
            env["INGEST_REPLICA_INDEX"], env["INGEST_REPLICAS"] = str(index), str(workers)
            if http_port:
                env["INGEST_HTTP_PORT"] = str(http_port + index)
            children.append(
                subprocess.Popen([sys.executable, "-m", "ingest", "run", *arguments], env=env)
            )
        if stopping:  # reach a worker started while the signal was being handled
            stop(signal.SIGTERM)
        logger.info("workers started", workers=workers, pids=[c.pid for c in children])
        while any(child.poll() is None for child in children):
            if not stopping and any(child.poll() is not None for child in children):
                logger.warning("a worker exited; stopping the others")
                stop(signal.SIGTERM)
            time.sleep(0.1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    codes = [child.returncode for child in children]
    logger.info("workers stopped", exit_codes=codes)
    return next((code for code in codes if code != 0), 0)
