"""Fixtures of the reliability suite: the real service as a subprocess, a real SMTP
server, unique queues and a ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.service import SmtpServer, smtp_server
from tests.reliability.harness import ServiceProcess
from tests.support import Broker


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    async with smtp_server() as server:
        yield server


@pytest.fixture
async def service(
    broker: Broker, queue_name: str, tmp_path: Path, smtp: SmtpServer
) -> AsyncIterator[ServiceProcess]:
    process = ServiceProcess(tmp_path, broker, queue_name, smtp_port=smtp.port)
    yield process
    if process.process is not None and process.process.returncode is None:
        process.process.kill()
        await process.process.wait()
