"""CsvFileProducer: a CSV file as a pipeline's input, failed rows to an errors CSV."""

from __future__ import annotations

import asyncio
import csv
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple, TextIO

import structlog

from ingest.acknowledger import validate_ack_options
from ingest.exceptions import BufferClosed
from ingest.message import Message
from ingest.producer import Sink

logger = structlog.get_logger("ingest.file")

_CHUNK = 500


class CsvFileProducer:
    """Feeds a pipeline the rows of a CSV file (RFC 4180, see `csv_rows`), one message per
    row.

    A message's `data` is the row's text as written in the file, quotes and all, in bytes
    (as a broker would deliver a body: the handlers parse it) and its metadata has `line`,
    the line the row starts on (its line number, unless a row above holds a line break
    inside quotes), and a `message_id` of `<file name>:<line>`, so running the same file
    twice creates nothing twice. Rows that fail are written, with their reason, to
    `<file>.errors.csv` (`line,row,reason`; cells a spreadsheet would take for a formula
    are neutralised, see `spreadsheet_safe`). `finished` is set once the file was read
    to its end and every row settled, and only then: a file whose reading a drain stopped
    is not finished (whoever runs it reads it again). With `header=True` the first row is
    a header and no message. A UTF-8 byte order mark (what spreadsheets write) is skipped.
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
        self._read_to_end = False  # not when a drain stopped the reading: nothing is finished
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
        self._read_to_end = self._draining = False
        self._close_errors()
        self._task = sink.spawn(self._feed(sink), f"csv-{self.path.name}")

    async def _feed(self, sink: Sink) -> None:
        rows = rows_of(self.path)
        if self.header:
            await asyncio.to_thread(_take, rows, 1)
        while True:
            await self._flowing.wait()  # drain() sets it too
            if self._draining:
                break
            chunk = await asyncio.to_thread(_take, rows, _CHUNK)
            if not chunk:
                self._read_to_end = True
                break
            messages = [
                Message(
                    row.text.encode("utf-8", "surrogateescape"),
                    self,
                    ack_data=row.text,
                    metadata={"line": row.line, "message_id": f"{self.path.name}:{row.line}"},
                )
                for row in chunk
            ]
            self.read += len(messages)
            try:
                await sink.push(messages)
            except BufferClosed:
                break
        self._check_finished()

    async def ack(self, successful: list[Message], failed: list[Message]) -> None:
        self.successful += len(successful)
        self.failed += len(failed)
        if failed:
            if self._writer is None:
                # A row that is not UTF-8 (read with surrogateescape) shows its bytes escaped.
                self._errors = _errors_file(self.errors_path)
                self._writer = csv.writer(self._errors)
                self._writer.writerow(["line", "row", "reason"])
            for message in failed:
                # ack_data holds the row as read: handlers may have replaced `data`.
                row = (message.metadata.get("line"), message.ack_data, message.failure_reason)
                self._writer.writerow([spreadsheet_safe(cell) for cell in row])
            assert self._errors is not None
            self._errors.flush()
        self._check_finished()

    def configure(self, ack_data: Any, options: Mapping[str, Any]) -> Any:
        # A file has no requeue: the options are checked, and a failed row is a failed row.
        validate_ack_options(options)
        return ack_data

    def _check_finished(self) -> None:
        if self._read_to_end and self.successful + self.failed >= self.read:
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


class CsvRow(NamedTuple):
    """A row of a CSV file: the line it starts on, its text as written (quotes, and line
    breaks inside them, included; its own line end not) and its fields, or None for a
    JSON line and for a row that does not parse."""

    line: int
    text: str
    fields: list[str] | None


def csv_rows(lines: Iterable[str]) -> Iterator[CsvRow]:
    """The rows of CSV text given as lines with their line ends (a file opened with
    `newline=""`), as RFC 4180 and spreadsheets write them: fields in double quotes may
    hold commas, doubled quotes and line breaks, and a line ends with CRLF, LF or CR.

    Blank lines are no rows. A line starting with `{` or `[` is a JSON line, one row
    whatever it holds (its quotes are JSON's). A row the `csv` module cannot read (text
    after a closing quote, a quote never closed) is still a row, without fields: parsed
    again by whoever takes it, it fails with its reason instead of being lost. Reading
    goes on at the next line."""
    source = _LineSource(lines)
    reader = csv.reader(source, strict=True)
    while (first := source.peek()) is not None:
        start = source.count + 1
        source.taken.clear()
        if not first.strip() or first.lstrip().startswith(("{", "[")):
            next(source)
            if first.strip():
                yield CsvRow(start, first.rstrip("\r\n"), None)
            continue
        try:
            fields: list[str] | None = next(reader)
        except csv.Error:
            fields = None
        yield CsvRow(start, "".join(source.taken).rstrip("\r\n"), fields)


class _LineSource:
    """The csv reader's input: it hands the reader lines one by one, keeping those taken
    for the row at hand (the row's text, which the reader does not give) and counting
    them (where the next row starts); `peek` looks at the next line without taking it."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = iter(lines)
        self._next: str | None = None
        self.taken: list[str] = []
        self.count = 0

    def peek(self) -> str | None:
        if self._next is None:
            self._next = next(self._lines, None)
        return self._next

    def __iter__(self) -> _LineSource:
        return self

    def __next__(self) -> str:
        line = self.peek()
        if line is None:
            raise StopIteration
        self._next = None
        self.count += 1
        self.taken.append(line)
        return line


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: object) -> object:
    """`cell` as a CSV for people may hold it: text a spreadsheet would run as a formula
    (starting with = + - @, a tab or a carriage return: `=HYPERLINK(...)`, `+cmd|...`)
    gets a leading single quote, which makes it text (OWASP's rule against CSV
    injection). Failed rows go back verbatim to whoever opens the errors CSV."""
    if isinstance(cell, str) and cell.startswith(_FORMULA_STARTS):
        return "'" + cell
    return cell


def rows_of(path: Path) -> Iterator[CsvRow]:
    """The file's rows (`csv_rows`), a byte order mark skipped; bytes that are not UTF-8
    kept as they are (the handlers say so): `row.text.encode("utf-8", "surrogateescape")`
    gives them back."""
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as file:
        yield from csv_rows(file)


def _take(rows: Iterator[CsvRow], count: int) -> list[CsvRow]:
    chunk = []
    for item in rows:
        chunk.append(item)
        if len(chunk) == count:
            break
    return chunk


def _errors_file(path: Path) -> TextIO:
    """The errors CSV, created readable and writable by its owner only (its rows are what
    people sent, which may be personal)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    return os.fdopen(descriptor, "w", newline="", encoding="utf-8", errors="backslashreplace")
