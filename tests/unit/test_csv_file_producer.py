"""CsvFileProducer: `finished` means every row of the file was settled, never that a drain
stopped the reading (an upload stopped early must resume, not be reported done)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ingest import Handlers, Message, Pipeline
from ingest.producers.csv_file import CsvFileProducer


class Rows(Handlers):
    def __init__(self) -> None:
        self.handled = 0
        self.started = asyncio.Event()

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.handled += 1
        self.started.set()
        if message.data == b"bad":
            message.failed("a bad row")
        return message


def rows_file(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "rows.csv"
    path.write_text("".join(f"{row}\n" for row in rows))
    return path


async def test_a_file_read_to_its_end_is_finished_once_every_row_is_settled(
    tmp_path: Path,
) -> None:
    producer = CsvFileProducer(rows_file(tmp_path, ["a", "bad", "c"]))
    pipeline = Pipeline("file", Rows(), producer)
    await pipeline.start()
    try:
        await asyncio.wait_for(producer.finished.wait(), 5)
    finally:
        await pipeline.stop()
    assert (producer.read, producer.successful, producer.failed) == (3, 2, 1)


async def test_a_file_drained_before_its_end_is_not_finished(tmp_path: Path) -> None:
    producer = CsvFileProducer(rows_file(tmp_path, [f"row{i}" for i in range(5000)]))
    await producer.pause()  # started, then stopped before it read a row
    handlers = Rows()
    pipeline = Pipeline("file", handlers, producer)
    await pipeline.start()
    await pipeline.stop()
    assert (producer.read, handlers.handled) == (0, 0)
    assert not producer.finished.is_set()


async def test_a_file_drained_part_way_is_not_finished(tmp_path: Path) -> None:
    producer = CsvFileProducer(rows_file(tmp_path, [f"row{i}" for i in range(5000)]))
    handlers = Rows()
    pipeline = Pipeline("file", handlers, producer)
    await pipeline.start()
    await asyncio.wait_for(handlers.started.wait(), 5)
    await producer.pause()
    await pipeline.stop()
    # Rows read but not yet taken by a processor are left unsettled (a broker would
    # redeliver them; a file is read again from its start).
    assert 0 < producer.successful <= producer.read < 5000
    assert not producer.finished.is_set()
