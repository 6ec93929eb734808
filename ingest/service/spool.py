"""The upload spool: uploaded CSV files on disk, checked while they arrive (the form they
come in and its address too), each with a manifest that says how far its processing got
(so that it resumes after a restart)."""

from __future__ import annotations

import asyncio
import codecs
import fcntl
import json
import os
import secrets
import stat
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

import structlog
from aiohttp import BodyPartReader, MultipartReader
from aiohttp.http_exceptions import HttpProcessingError
from email_validator import EmailNotValidError, validate_email

from ingest.exceptions import UploadRejected
from ingest.producers.csv_file import csv_rows
from ingest.service.upload_form import UploadForm

logger = structlog.get_logger("ingest.service.spool")

State = Literal["queued", "processing", "reporting", "done", "failed"]
PENDING: tuple[State, ...] = ("reporting", "processing", "queued")  # finish before starting
_SHAPE_LINES = 10  # a CSV shows its columns within this many lines
FILENAME_MAX = 200  # characters of an uploaded file's name kept (its end: the extension)
EMAIL_MAX = 320  # bytes: RFC 5321's longest address, with room
CHUNK_BYTES = 64 * 1024


@dataclass
class Upload:
    """One uploaded file and what became of it: its manifest, `<id>.json` beside the file
    `<id>.csv` (whose name makes its rows' message ids: `<id>.csv:<line>`)."""

    id: str
    pipeline: str
    filename: str
    email: str
    size: int
    rows: int
    header: bool
    created: float
    state: State = "queued"
    started: float | None = None
    finished: float | None = None
    successful: int = 0
    failed: int = 0
    error: str | None = None
    attempts: int = 0  # how often processing began (more than once: resumed)
    mailed: bool = False
    report_error: str | None = None


class Spool:
    """Uploads under `directory`, at most `max_bytes` each::

    upload = await Spool(Path("var/uploads"), 50_000_000).receive(
        "orders", "mine.csv", "me@example.com", chunks, shape=UploadForm("orders", ("sku", "n")))
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._uploads: dict[str, Upload] | None = None
        self._lock: IO[str] | None = None

    def claim(self) -> bool:
        """Whether this process owns the spool (an exclusive lock on `<directory>/.lock`,
        held until `release`): only the owner takes and processes uploads, so two
        workers sharing a directory never work on one upload side by side."""
        if self._lock is None:
            self._make_directory()
            lock = (self.directory / ".lock").open("a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                return False
            self._lock = lock
        return True

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # which releases the lock
            self._lock = None

    def file(self, upload: Upload) -> Path:
        return self.directory / f"{upload.id}.csv"

    def errors_file(self, upload: Upload) -> Path:
        return self.directory / f"{upload.id}.errors.csv"

    async def receive(
        self,
        pipeline: str,
        filename: str,
        email: str,
        chunks: AsyncIterator[bytes],
        *,
        shape: UploadForm,
    ) -> Upload:
        """Write `chunks` to disk, checking them as they come: UploadRejected (and nothing
        kept) when the file is too large, not UTF-8, not CSV of `shape`'s rows or empty.
        The upload is not
        in the spool until `save`d (or gone again with `discard`)."""
        self._make_directory()
        upload_id = f"u{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(4)}"
        partial = self.directory / f".{upload_id}.part"
        try:
            size = await _write_checked(chunks, partial, self.max_bytes)
            rows, header = await asyncio.to_thread(_inspect, partial, shape)
            upload = Upload(
                upload_id, pipeline, _base_name(filename), email, size, rows, header, time.time()
            )
            partial.rename(self.file(upload))
        finally:
            partial.unlink(missing_ok=True)
        return upload

    async def receive_form(
        self, pipeline: str, form: MultipartReader, *, shape: UploadForm
    ) -> Upload:
        """An upload as `POST /uploads/<pipeline>` takes it, multipart/form-data with the
        fields `email` and `file` in either order: the file received (`receive`), the
        address checked (`email_address`). ValueError, saying why, for a body that is not
        such a form (a header that does not parse, a part without a name, two files, the
        body cut short) or an address that is not one; UploadRejected for a file refused.
        Nothing is kept then; other fields are ignored."""
        email: str | None = None
        upload: Upload | None = None
        try:
            while (part := await _next_part(form)) is not None:
                if part.name == "email":
                    email = email_address(await _text(part, EMAIL_MAX))
                elif part.name == "file":
                    if upload is not None:
                        raise ValueError("one file per upload: the form has two in 'file'")
                    filename = part.filename or "upload.csv"
                    upload = await self.receive(pipeline, filename, "", _chunks(part), shape=shape)
            if upload is None:
                raise ValueError("no file: send it in the field 'file'")
            if email is None:
                raise ValueError("an email address is needed in the field 'email'")
        except BaseException:
            if upload is not None:
                self.discard(upload)
            raise
        upload.email = email
        return upload

    def _make_directory(self) -> None:
        """The spool's directory, readable by the service's user only: uploaded files and
        manifests hold what people sent and their addresses. A directory the service does not
        own (a volume mounted so) keeps its mode, and a log line says so."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if stat.S_IMODE(self.directory.stat().st_mode) & 0o077:
            try:
                self.directory.chmod(0o700)
            except PermissionError as error:
                logger.warning(
                    "upload directory readable by others",
                    directory=str(self.directory),
                    error=str(error),
                )

    def discard(self, upload: Upload) -> None:
        """Forget an upload received but not wanted (its request was refused)."""
        self.file(upload).unlink(missing_ok=True)

    def save(self, upload: Upload) -> None:
        """Write the manifest whole (a rename), never half."""
        path = self.directory / f"{upload.id}.json"
        temporary = path.with_name(f".{path.name}.tmp")
        with _private(temporary, "w") as file:
            file.write(json.dumps(asdict(upload)))
        temporary.replace(path)
        self._known()[upload.id] = upload

    def get(self, upload_id: str) -> Upload | None:
        return self._known().get(upload_id)

    def all(self) -> list[Upload]:
        """Every upload, newest first."""
        return sorted(self._known().values(), key=lambda u: u.created, reverse=True)

    def _known(self) -> dict[str, Upload]:
        """The manifests, read from disk once (then kept by `save`)."""
        if self._uploads is None:
            self._uploads = {}
            for path in self.directory.glob("u*.json") if self.directory.is_dir() else ():
                try:
                    upload = Upload(**json.loads(path.read_text(encoding="utf-8")))
                except (OSError, ValueError, TypeError) as error:
                    logger.error(
                        "unreadable upload manifest, left alone", path=str(path), error=repr(error)
                    )
                    continue
                self._uploads[upload.id] = upload
        return self._uploads

    def next_pending(self, pipelines: Collection[str]) -> Upload | None:
        """The upload to work on for one of `pipelines`: one being reported or processed
        (a restart interrupted it) before the oldest queued one."""
        pending = [u for u in self.all() if u.state in PENDING and u.pipeline in pipelines]
        pending.sort(key=lambda u: (PENDING.index(u.state), u.created))
        return pending[0] if pending else None


async def _write_checked(chunks: AsyncIterator[bytes], path: Path, max_bytes: int) -> int:
    text = _TextCheck()
    size = 0
    with _private(path, "wb") as file:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise UploadRejected(
                    f"the file is larger than the limit of {max_bytes:,} bytes "
                    "(INGEST_UPLOAD_MAX_BYTES)",
                    too_large=True,
                )
            text.check(chunk)
            file.write(chunk)
        text.check(b"", final=True)
        file.flush()
        await asyncio.to_thread(os.fsync, file.fileno())
    return size


class _TextCheck:
    """UTF-8 without NUL characters, checked piece by piece (a character may be cut
    between two pieces); the error names the line."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._lines = 1

    def check(self, chunk: bytes, final: bool = False) -> None:
        try:
            text = self._decoder.decode(chunk, final)
        except UnicodeDecodeError as error:
            line = self._lines + chunk.count(b"\n", 0, max(error.start, 0))
            raise UploadRejected(
                f"not UTF-8: line {line:,} has bytes that are not UTF-8; save the file as CSV UTF-8"
            ) from None
        if "\0" in text:
            raise UploadRejected("not a CSV file: it holds binary data (NUL bytes)")
        self._lines += text.count("\n")


def _inspect(path: Path, shape: UploadForm) -> tuple[int, bool]:
    """How many rows the file has (as the CSV producer reads them: CSV rows, a quoted line
    break inside one; JSON lines) and whether its first row is a header; UploadRejected
    when it is empty or not a CSV of `shape`'s rows."""
    rows, shaped, header = 0, False, False
    with path.open(encoding="utf-8-sig", newline="") as file:
        for row in csv_rows(file):
            if rows == 0 and not header and shape.is_header(row):
                header = True
                continue
            rows += 1
            if rows <= _SHAPE_LINES and not shaped:
                shaped = shape.fitting(row)
    if rows == 0:
        raise UploadRejected("the file is empty: no rows" + (" under its header" if header else ""))
    if not shaped:
        raise UploadRejected(shape.misfit(_SHAPE_LINES))
    return rows, header


def _base_name(filename: str) -> str:
    """The file's own name, whatever path a browser sent with it (C:\\fakepath\\...),
    made fit for where it goes (the page, logs, the report's subject): whitespace such as
    a line break becomes one space, other characters that are not printable (controls,
    bidirectional overrides) are dropped, and only its last FILENAME_MAX characters are
    kept. A line break in an email header would make the report impossible to send."""
    name = Path(filename.replace("\\", "/")).name
    kept = "".join(c if c.isprintable() else " " for c in name if c.isprintable() or c.isspace())
    return " ".join(kept.split())[-FILENAME_MAX:].strip() or "upload.csv"


def email_address(text: str) -> str:
    """`text` as an email address, normalised (`Me@EXAMPLE.com`: `Me@example.com`), or
    ValueError with email-validator's reason. Syntax only, no DNS: a typo in a domain is
    the mail server's to find. Display names, quoted local parts, commas and line breaks
    are refused, so what is kept is what an SMTP command can carry as it is."""
    if not text:
        raise ValueError("an email address is needed in the field 'email'")
    try:
        return validate_email(text, check_deliverability=False).normalized
    except EmailNotValidError as error:
        raise ValueError(f"not a valid email address in the field 'email': {error}") from None


# -- reading the form -----------------------------------------------------------------
# aiohttp parses a multipart body as it is read, and says it is malformed with ValueError
# (no boundary, the body cut short) or HttpProcessingError (a part's header with a NUL or
# without a colon): each becomes one ValueError, which the server answers with 400.


def _malformed(error: Exception) -> ValueError:
    reason = error.message if isinstance(error, HttpProcessingError) else str(error)
    return ValueError(f"not a valid multipart/form-data body: {reason}")


async def _next_part(form: MultipartReader) -> BodyPartReader | None:
    """The form's next part, None after the last; a part must be a field with a name."""
    try:
        part = await form.next()
    except (ValueError, HttpProcessingError) as error:
        raise _malformed(error) from None
    if part is None:
        return None
    if not isinstance(part, BodyPartReader):
        raise ValueError("a part holds parts of its own: send the fields email and file")
    if not part.name:
        raise ValueError(
            "a part without a name: each part needs Content-Disposition: form-data; name=..."
        )
    return part


async def _read(part: BodyPartReader, size: int) -> bytes:
    """The part's next bytes (b"" at its end); ValueError when the body ends before the
    part does (aiohttp returns what came, then nothing)."""
    try:
        chunk = await part.read_chunk(size)
    except (ValueError, HttpProcessingError) as error:
        raise _malformed(error) from None
    if not chunk and not part.at_eof():
        raise _malformed(ValueError(f"the body ends inside the field {part.name!r}"))
    return chunk


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await _read(part, CHUNK_BYTES):
        yield chunk


async def _text(part: BodyPartReader, limit: int) -> str:
    """A short text field, trimmed: ValueError past `limit` bytes (never cut short and
    taken) or when it is not UTF-8."""
    data = b""
    # aiohttp reads no less than a boundary's length at a time: chunks of 1 KiB.
    while chunk := await _read(part, 1024):
        data += chunk
        if len(data) > limit:
            raise ValueError(f"the field {part.name!r} is longer than {limit} bytes")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"the field {part.name!r} is not UTF-8") from None


def _private(path: Path, mode: Literal["w", "wb"]) -> IO[Any]:
    """`path` opened for writing, created readable and writable by its owner only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    if mode == "wb":
        return os.fdopen(descriptor, "wb")
    return os.fdopen(descriptor, "w", encoding="utf-8")
