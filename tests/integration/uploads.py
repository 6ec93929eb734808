"""Helpers of the upload tests: a CSV of bookings with a few bad rows, and the reports
the service emails about it."""

from __future__ import annotations

import csv
import io
from email import message_from_bytes
from email.message import Message as EmailMessage
from pathlib import Path

BAD_ROWS = {3: "cinema,999", 7: "not a booking", 12: "musical,abc"}


def bookings_csv(rows: int) -> bytes:
    """A header, then `rows` rows of which those of BAD_ROWS (by file line) fail."""
    lines = ["event,user_id"]
    for line in range(2, rows + 2):
        lines.append(
            BAD_ROWS.get(line, f"{('cinema', 'musical', 'opera')[line % 3]},{line % 3 + 1}")
        )
    return ("\n".join(lines) + "\n").encode()


def reports(outbox: Path) -> list[EmailMessage]:
    emails = [message_from_bytes(p.read_bytes()) for p in sorted(outbox.glob("*.eml"))]
    return [e for e in emails if str(e["Subject"]).startswith("Your upload")]


def attachment_rows(report: EmailMessage) -> list[list[str]]:
    for part in report.walk():
        if part.get_content_disposition() == "attachment":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return list(csv.reader(io.StringIO(payload.decode())))
    raise AssertionError("the report has no attachment")
