"""Uploads: spooled CSV files processed in the background, one at a time, by a pipeline
reading the file (the CSV producer), then reported to the person who uploaded it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from ingest.exceptions import ReportDeferred
from ingest.pipeline import Pipeline
from ingest.producers.csv_file import CsvFileProducer
from ingest.service.logging import FAILURE_EVENTS, SampledFailures
from ingest.service.spool import Spool, Upload
from ingest.service.upload_form import UploadForm
from ingest.service.workers import worker_index
from ingest.waiting import first_of

logger = structlog.get_logger("ingest.service.uploads")

REPORT_RETRY_S = (1.0, 5.0, 15.0, 60.0)  # a mail server that is down is tried again
ROW_OUTCOMES = ("successful", "failed")  # as the CSV producer settles a row


class FileProcessing(Protocol):
    """What a hosted pipeline offers for uploads: the rows it takes (`form`: the spool
    refuses a file of other rows, the page shows its columns), the same pipeline over a
    file, and the report to whoever uploaded it (e.g. an email with the errors CSV
    attached).

    `report` raises ReportDeferred when the report may go later; any other exception says
    it never will (a permanent refusal, a value the email cannot carry), and the upload
    fails at once rather than hold up the uploads queued after it."""

    @property
    def form(self) -> UploadForm: ...

    def pipeline(self, producer: CsvFileProducer, name: str) -> Pipeline: ...

    async def report(self, upload: Upload, errors: Path | None) -> None: ...


class Uploads:
    """Works through the spool: the upload a restart interrupted first (processing a file
    again books nothing twice: its rows' message ids are the upload's), then the oldest
    queued one. `run()` is owned by the service; `stop()` drains the pipeline at work and
    leaves its upload to resume."""

    def __init__(self, spool: Spool, processing: Mapping[str, FileProcessing]) -> None:
        self.spool = spool
        self.processing = processing
        self.owner = False  # whether this process took the spool (`claim`)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._current: tuple[Upload, CsvFileProducer] | None = None
        # Rows settled by the uploads processed in this process, per (pipeline, outcome),
        # the one at work not yet included (`rows()` adds its live counts).
        self._rows: Counter[tuple[str, str]] = Counter()

    def claim(self) -> bool:
        """Take the spool for this process, if there are uploads to process and no other
        process took it. The workers of `ingest run --workers N` leave the uploads to
        worker 0, where their supervisor sends them (whichever worker started first)."""
        worker = worker_index()
        if worker is not None and worker != 0:
            return False
        if self.processing and not self.owner:
            self.owner = self.spool.claim()
            if not self.owner:
                logger.warning(
                    "another process takes the uploads", directory=str(self.spool.directory)
                )
        return self.owner

    def wake(self) -> None:
        """A new upload is in the spool."""
        self._wake.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            upload = self.spool.next_pending(self.processing)
            if upload is None:
                await self._wake.wait()
                continue
            if upload.state in ("queued", "processing"):
                await self._process(upload, self.processing[upload.pipeline])
            if upload.state == "reporting" and not self._stopping.is_set():
                await self._report(upload, self.processing[upload.pipeline])

    async def _process(self, upload: Upload, processing: FileProcessing) -> None:
        producer = CsvFileProducer(
            self.spool.file(upload), self.spool.errors_file(upload), header=upload.header
        )
        pipeline = processing.pipeline(producer, f"{upload.pipeline}-upload")
        failures = SampledFailures()  # a file may fail by the thousand rows
        pipeline.events.subscribe(failures, kinds=FAILURE_EVENTS)
        log = logger.bind(upload=upload.id, pipeline=upload.pipeline)
        upload.state, upload.started, upload.error = "processing", time.time(), None
        upload.attempts += 1
        self.spool.save(upload)
        log.info("upload processing", rows=upload.rows, attempt=upload.attempts)
        try:
            await pipeline.start()
        except Exception as error:  # its file is gone or unreadable: reported, not retried
            upload.state, upload.finished = "reporting", time.time()
            upload.error = f"cannot read the file: {error}"
            log.error("upload failed", error=upload.error)
            self.spool.save(upload)
            return
        self._current = (upload, producer)
        try:
            await first_of(
                producer.finished.wait(),
                pipeline.wait(),  # ends early only when it failed
                self._stopping.wait(),
            )
            await pipeline.stop()
        finally:
            # Counted and forgotten in one step: `rows()` never sees them twice or not at all.
            self._rows.update(
                {
                    (upload.pipeline, "successful"): producer.successful,
                    (upload.pipeline, "failed"): producer.failed,
                }
            )
            self._current = None
            failures.flush(pipeline.name)
        upload.successful, upload.failed = producer.successful, producer.failed
        if producer.finished.is_set():
            upload.state, upload.finished = "reporting", time.time()
            log.info("upload processed", successful=upload.successful, failed=upload.failed)
        elif pipeline.state == "failed":
            upload.state, upload.finished = "reporting", time.time()
            upload.error = f"processing failed: {pipeline.failure}"
            log.error("upload failed", error=upload.error)
        else:
            log.info("upload interrupted: it resumes when the service starts again")
        self.spool.save(upload)

    async def _report(self, upload: Upload, processing: FileProcessing) -> None:
        """Mail the report, trying again (REPORT_RETRY_S, and after a restart) only what
        may go later; a report that never will fails the upload at once."""
        errors = self.spool.errors_file(upload) if upload.failed else None
        for delay in (*REPORT_RETRY_S, None):
            deferred = await self._send_report(upload, processing, errors, delay)
            if not deferred or delay is None or await self._stopped_within(delay):
                break
        if deferred and self._stopping.is_set():
            return  # tried again after the restart
        upload.state = "done" if upload.mailed and upload.error is None else "failed"
        self.spool.save(upload)
        logger.info("upload reported", upload=upload.id, mailed=upload.mailed, state=upload.state)

    async def _send_report(
        self,
        upload: Upload,
        processing: FileProcessing,
        errors: Path | None,
        retry_in: float | None,
    ) -> bool:
        """One attempt: whether the report may go later."""
        try:
            await processing.report(upload, errors)
        except ReportDeferred as error:  # the mail server: down, slow, refusing for now
            logger.warning(
                "upload report not sent yet", upload=upload.id, error=str(error), retry_in=retry_in
            )
            upload.report_error = str(error)
            self.spool.save(upload)
            return True
        except Exception as error:  # a permanent refusal, a value the email cannot carry
            logger.error("upload report cannot be sent", upload=upload.id, error=repr(error))
            upload.report_error = repr(error)
            return False
        upload.mailed, upload.report_error = True, None
        return False

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            return False
        return True

    def rows(self) -> dict[tuple[str, str], int]:
        """Rows settled by uploads in this process, per (pipeline, outcome: successful,
        failed), the upload at work counted as it goes (`ingest_upload_rows_total`). Each
        pipeline that takes uploads has both outcomes, at 0 before its first row. An upload
        resumed after a restart is read again from its start: its rows count again."""
        rows = Counter(self._rows)
        if self._current is not None:
            upload, producer = self._current
            rows[(upload.pipeline, "successful")] += producer.successful
            rows[(upload.pipeline, "failed")] += producer.failed
        return {
            (name, outcome): rows[(name, outcome)]
            for name in self.processing
            for outcome in ROW_OUTCOMES
        }

    def forms(self) -> dict[str, dict[str, Any]]:
        """Where uploads go and what rows each takes, for the page's form."""
        return {name: processing.form.view() for name, processing in self.processing.items()}

    def view(self, limit: int = 20, *, private: bool = False) -> list[dict[str, Any]]:
        """The latest uploads with their progress (the one at work: live figures); email
        addresses only when `private`."""
        return [self.describe(u, private=private) for u in self.spool.all()[:limit]]

    def describe(self, upload: Upload, *, private: bool = False) -> dict[str, Any]:
        successful, failed = upload.successful, upload.failed
        current = self._current
        if current is not None and current[0].id == upload.id:
            successful, failed = current[1].successful, current[1].failed
        done = successful + failed
        rate = eta = None
        if upload.started:  # rows a second, so far or overall
            elapsed = max((upload.finished or time.time()) - upload.started, 1e-3)
            rate = done / elapsed
        if upload.state == "processing" and rate:
            eta = (upload.rows - done) / rate
        return {
            "id": upload.id,
            "pipeline": upload.pipeline,
            "filename": upload.filename,
            "email": upload.email if private else _masked(upload.email),
            "state": upload.state,
            "rows": upload.rows,
            "successful": successful,
            "failed": failed,
            "rate": round(rate, 1) if rate is not None else None,
            "eta_s": round(eta, 1) if eta is not None else None,
            "created": upload.created,
            "finished": upload.finished,
            "attempts": upload.attempts,
            "mailed": upload.mailed,
            "error": upload.error,
            "report_error": upload.report_error,
        }


def _masked(email: str) -> str:
    """`a…@example.com`: enough to recognise one's own upload on a read-only page."""
    name, _, domain = email.partition("@")
    return f"{name[:1]}…@{domain}"
