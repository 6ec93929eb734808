"""Uploads of bookings: the bookings pipeline over an uploaded CSV file, and the email that
tells the person who uploaded it how it went."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from ingest import Pipeline
from ingest.exceptions import ReportDeferred
from ingest.producers.csv_file import CsvFileProducer
from ingest.service.spool import Upload
from ingest.service.upload_form import UploadForm
from pipelines.mail import Mailer, upload_report
from pipelines.smtp import SmtpError


class FileUploads:
    """`form` says what rows a file holds; `pipeline()` builds the hosted pipeline's twin
    over a file (`make_pipeline`: the same handlers, so the same database and notifier,
    and the same stages); `report()` mails the summary, with the errors CSV attached when
    rows failed."""

    def __init__(
        self,
        make_pipeline: Callable[[str, CsvFileProducer], Pipeline],
        mailer: Mailer,
        sender: str,
        form: UploadForm,
    ) -> None:
        self.make_pipeline = make_pipeline
        self.mailer = mailer
        self.sender = sender
        self.form = form

    def pipeline(self, producer: CsvFileProducer, name: str) -> Pipeline:
        return self.make_pipeline(name, producer)

    async def report(self, upload: Upload, errors: Path | None) -> None:
        """Mail the report. ReportDeferred when the mail server may take it later (it is
        down or unreachable, or refused it for now: 4xx); what can never go raises as it
        is: a permanent refusal (5xx), a value the email cannot carry (ValueError)."""
        attachment = (errors, f"{Path(upload.filename).stem}.errors.csv") if errors else None
        message = await asyncio.to_thread(
            upload_report, self.sender, upload.email, summary(upload), subject(upload), attachment
        )
        try:
            await self.mailer.send(message)
        except SmtpError as error:
            if 400 <= error.code < 500:
                raise ReportDeferred(str(error)) from error
            raise
        except OSError as error:  # refused, reset, timed out, unreachable, a full outbox
            raise ReportDeferred(f"the mail server: {error!r}") from error

    async def close(self) -> None:
        await self.mailer.close()


def subject(upload: Upload) -> str:
    if upload.error is not None:
        return f"Your upload {upload.filename} stopped: {upload.successful:,} booked"
    return f"Your upload {upload.filename}: {upload.successful:,} booked, {upload.failed:,} failed"


def summary(upload: Upload) -> list[str]:
    took = (upload.finished or 0.0) - (upload.started or 0.0)
    lines = [
        f"Your file {upload.filename} (upload {upload.id}) has been processed.",
        "",
        f"Rows:   {upload.rows:,}",
        f"Booked: {upload.successful:,}",
        f"Failed: {upload.failed:,}",
        f"Took:   {took:,.1f} s",
    ]
    if upload.failed:
        lines += ["", "The rows that failed, with their reasons, are in the attached errors CSV."]
    if upload.error is not None:
        left = upload.rows - upload.successful - upload.failed
        lines += ["", f"Processing stopped before the end ({left:,} rows left): {upload.error}"]
    return lines
