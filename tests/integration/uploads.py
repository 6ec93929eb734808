"""Helpers of the upload tests: a CSV of bookings with a few bad rows, the calls of the
upload endpoints (as a form, or as a raw body a client may get wrong), and the reports
the service emails about an upload."""

from __future__ import annotations

import csv
import io
from email import message_from_bytes
from email.message import Message as EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import select

from pipelines.db import tickets
from tests.integration.service import RunningService
from tests.support import eventually

TOKEN = "upload-admin-token"
AUTHORIZATION = {"Authorization": f"Bearer {TOKEN}"}
BAD_ROWS = {3: "cinema,999", 7: "not a booking", 12: "musical,abc"}


def bookings_csv(rows: int) -> bytes:
    """A header, then `rows` rows of which those of BAD_ROWS (by file line) fail."""
    lines = ["event,user_id"]
    for line in range(2, rows + 2):
        lines.append(
            BAD_ROWS.get(line, f"{('cinema', 'musical', 'opera')[line % 3]},{line % 3 + 1}")
        )
    return ("\n".join(lines) + "\n").encode()


async def upload(
    service: RunningService,
    data: bytes,
    email: str | None = "me@example.com",
    *,
    pipeline: str = "bookings",
    token: str | None = TOKEN,
    filename: str = "bookings.csv",
) -> tuple[int, Any]:
    """POST the file and the address as a form, as the page and curl do."""
    form = aiohttp.FormData()
    if email is not None:
        form.add_field("email", email)
    form.add_field("file", data, filename=filename, content_type="text/csv")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{service.http}/uploads/{pipeline}", data=form, headers=headers) as response,
    ):
        return response.status, await response.json()


async def post_raw(service: RunningService, body: bytes, content_type: str) -> tuple[int, Any]:
    """POST `body` as it is, under `content_type`: a form no library would write. The
    answer's JSON, or its text when it is not JSON (a traceback page)."""
    headers = {**AUTHORIZATION, "Content-Type": content_type}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{service.http}/uploads/bookings", data=body, headers=headers) as response,
    ):
        text = await response.text()
        try:
            return response.status, await response.json(content_type=None)
        except ValueError:
            return response.status, text


def multipart(boundary: str, *parts: tuple[bytes, bytes]) -> bytes:
    """A multipart body written by hand: each part its header block and its content."""
    body = b"".join(
        b"--%s\r\n%s\r\n\r\n%s\r\n" % (boundary.encode(), head, content) for head, content in parts
    )
    return body + b"--%s--\r\n" % boundary.encode()


async def status(service: RunningService, upload_id: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{service.http}/uploads/{upload_id}", headers=AUTHORIZATION) as response,
    ):
        assert response.status == 200
        answer: dict[str, Any] = await response.json()
        return answer


async def finished(service: RunningService, upload_id: str, timeout: float = 60) -> dict[str, Any]:
    async def ended() -> bool:
        return (await status(service, upload_id))["state"] in ("done", "failed")

    await eventually(ended, timeout=timeout)
    return await status(service, upload_id)


async def errors_csv(service: RunningService, upload_id: str) -> list[list[str]]:
    """The upload's errors CSV as `GET /uploads/{id}/errors.csv` serves it."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{service.http}/uploads/{upload_id}/errors.csv", headers=AUTHORIZATION
        ) as response,
    ):
        assert response.status == 200
        return list(csv.reader(io.StringIO(await response.text(), newline="")))


async def booked(service: RunningService, upload_id: str) -> list[str]:
    """The message ids of the upload's tickets."""
    return [message_id for message_id, _ in await booked_events(service, upload_id)]


async def booked_events(service: RunningService, upload_id: str) -> list[tuple[str, str]]:
    """The message ids of the upload's tickets, with the event each booked."""
    db = service.hosted["bookings"].pipeline.handlers.db  # type: ignore[attr-defined]
    async with db.engine.connect() as connection:
        rows = await connection.execute(
            select(tickets.c.message_id, tickets.c.event).where(
                tickets.c.message_id.like(f"{upload_id}.csv:%")
            )
        )
        return [(message_id, event) for message_id, event in rows]


def reports(outbox: Path) -> list[EmailMessage]:
    emails = [message_from_bytes(p.read_bytes()) for p in sorted(outbox.glob("*.eml"))]
    return [e for e in emails if str(e["Subject"]).startswith("Your upload")]


def attachment_rows(report: EmailMessage) -> list[list[str]]:
    for part in report.walk():
        if part.get_content_disposition() == "attachment":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return list(csv.reader(io.StringIO(payload.decode(), newline="")))
    raise AssertionError("the report has no attachment")


def report_text(report: EmailMessage) -> str:
    for part in report.walk():
        if part.get_content_type() == "text/plain" and part.get_content_disposition() is None:
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode().replace("\r\n", "\n")
    raise AssertionError("the report has no text")
