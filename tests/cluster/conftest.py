"""Fixtures of the cluster tests: a three-node RabbitMQ cluster started once for the
session (beside the main broker), a real SMTP server, and replicas of the service."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.cluster.rabbit import Cluster
from tests.integration.service import SmtpServer, smtp_server


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
        if os.environ.get("CI"):
            pytest.fail("rabbitmq-server is missing: the cluster tests start three nodes")
        pytest.skip("rabbitmq-server is not installed here")
    # INGEST_KEEP_CLUSTER=1 leaves the nodes running after the session, and the next
    # session uses them again (a quicker round while working on these tests).
    keep = bool(os.environ.get("INGEST_KEEP_CLUSTER"))
    started = Cluster(Path(tempfile.gettempdir()) / "ingest-test-cluster")
    if not (keep and started.healthy()):
        started.start()
    started.wait_for_management()
    try:
        yield started
    finally:
        if not keep:
            started.stop()


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    async with smtp_server() as server:
        yield server
