"""CsvFileProducer: a CSV file as a pipeline's input, failed rows to an errors CSV."""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import structlog

from ingest.acknowledger import validate_ack_options
from ingest.exceptions import BufferClosed
from ingest.message import Message
from ingest.producer import Sink

logger = structlog.get_logger("ingest.file")

_CHUNK = 500


class CsvFileProducer:
    """Feeds a pipeline the lines of a CSV file, one message per non-empty line.

    A message's `data` is the line's bytes (as a broker would deliver them) and its
    metadata has `line` and a `message_id` of `<file name>:<line>`, so running the same
    file twice creates nothing twice. Rows that fail are written, with their reason, to
    `<file>.errors.csv` (`line,row,reason`). `finished` is set once every row was settled.
    With `header=True` the first non-empty line is a header and no message. A UTF-8 byte
    order mark (what spreadsheets write) is skipped.
    """

    def __init__(
        self, path: Path, errors_path: Path | None = None, *, header: bool = False
    ) -> None:
        self.path = path
        self.errors_path = errors_path or path.with_name(f"{path.stem}.errors.csv")
        self.header = header
        self.finished = asyncio.Event()
        self.read = 0
        self.successful = 0
        self.failed = 0
        self._done_reading = False
        self._draining = False
        self._flowing = asyncio.Event()  # cleared while paused
        self._flowing.set()
        self._task: asyncio.Task[None] | None = None
        self._errors: IO[str] | None = None
        self._writer: Any = None

    async def start(self, sink: Sink) -> None:
        """Read the file from its first line (again, after a crash of the pipeline: rows
        already done create nothing twice, thanks to their message_id)."""
        if not self.path.is_file():
            raise FileNotFoundError(f"no such file: {self.path}")
        self.read = self.successful = self.failed = 0
        self._done_reading = self._draining = False
        self._close_errors()
        self._task = sink.spawn(self._feed(sink), f"csv-{self.path.name}")

    async def _feed(self, sink: Sink) -> None:
        lines = _numbered_lines(self.path)
        if self.header:
            await asyncio.to_thread(_take, lines, 1)
        while not self._draining:
            await self._flowing.wait()  # drain() sets it too: the loop's test ends it
            chunk = await asyncio.to_thread(_take, lines, _CHUNK) if not self._draining else []
            if not chunk:
                break
            messages = [
                Message(
                    text.encode("utf-8", "surrogateescape"),
                    self,
                    ack_data=text,
                    metadata={"line": number, "message_id": f"{self.path.name}:{number}"},
                )
                for number, text in chunk
            ]
            self.read += len(messages)
            try:
                await sink.push(messages)
            except BufferClosed:
                break
        self._done_reading = True
        self._check_finished()

    async def ack(self, successful: list[Message], failed: list[Message]) -> None:
        self.successful += len(successful)
        self.failed += len(failed)
        if failed:
            if self._writer is None:
                self._errors = self.errors_path.open("w", newline="", encoding="utf-8")
                self._writer = csv.writer(self._errors)
                self._writer.writerow(["line", "row", "reason"])
            for message in failed:
                # ack_data holds the row as read: handlers may have replaced `data`.
                self._writer.writerow(
                    [message.metadata.get("line"), message.ack_data, message.failure_reason]
                )
            assert self._errors is not None
            self._errors.flush()
        self._check_finished()

    def configure(self, ack_data: Any, options: Mapping[str, Any]) -> Any:
        # A file has no requeue: the options are checked, and a failed row is a failed row.
        validate_ack_options(options)
        return ack_data

    def _check_finished(self) -> None:
        if self._done_reading and self.successful + self.failed >= self.read:
            self.finished.set()

    async def pause(self) -> None:
        """Read no further rows until resumed (those read go on)."""
        self._flowing.clear()

    async def resume(self) -> None:
        self._flowing.set()

    async def drain(self) -> None:
        self._draining = True
        self._flowing.set()  # a paused reader wakes up to end

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._close_errors()
        logger.info(
            "file processed",
            file=str(self.path),
            rows=self.read,
            successful=self.successful,
            failed=self.failed,
            errors_file=str(self.errors_path) if self.failed else None,
        )

    def _close_errors(self) -> None:
        if self._errors is not None:
            self._errors.close()
        self._errors = self._writer = None


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as file:
        for number, line in enumerate(file, start=1):
            text = line.rstrip("\r\n")
            if text.strip():
                yield number, text


def _take(lines: Iterator[tuple[int, str]], count: int) -> list[tuple[int, str]]:
    chunk = []
    for item in lines:
        chunk.append(item)
        if len(chunk) == count:
            break
    return chunk
