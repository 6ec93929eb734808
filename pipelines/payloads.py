"""Parsing the payloads people type in the management UI: CSV or JSON, with clear errors."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from typing import Any

# What an SMTP command can carry too (pipelines.smtp.envelope_address): no space, comma
# or angle bracket, and (checked apart) nothing unprintable.
EMAIL = re.compile(r"^[^@\s,<>]+@[^@\s,<>]+\.[^@\s,<>]+$")
MAX_EVENT = 100


class PayloadError(ValueError):
    """A payload that can never be processed; its message is the dead letter's reason."""


@dataclass(frozen=True, slots=True)
class Booking:
    event: str
    user_id: int


@dataclass(frozen=True, slots=True)
class Notification:
    type: str
    recipient: str
    details: dict[str, Any]


def _text(body: bytes, limit: int) -> str:
    if len(body) > limit:
        raise PayloadError(f"payload of {len(body)} bytes exceeds the limit of {limit}")
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise PayloadError(f"payload is not valid UTF-8 (byte {exc.start})") from None
    if not text:
        raise PayloadError("empty payload")
    return text


def _csv_fields(text: str, shape: str) -> list[str]:
    """The fields of one CSV row, trimmed: RFC 4180, as spreadsheets write it (a field in
    double quotes may hold commas, doubled quotes and line breaks), whether it came as a
    message body or as a row of an uploaded file (the CSV producer hands rows over as
    written)."""
    if '"' not in text and "\n" not in text and "\r" not in text:
        return [field.strip() for field in text.split(",")]  # as typed: a split is cheaper
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as exc:
        raise PayloadError(f"not a CSV row: {exc}") from None
    if len(rows) != 1:
        raise PayloadError(f"expected one row '{shape}', got {len(rows)} rows")
    return [field.strip() for field in rows[0]]


def _json_object(text: str, fields: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PayloadError(f"invalid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(value, dict):
        raise PayloadError(f"JSON payload must be an object with {fields}")
    return value


def parse_booking(body: bytes, limit: int) -> Booking:
    """`event,user_id` or `{"event": ..., "user_id": ...}`."""
    text = _text(body, limit)
    if text[0] in "{[":
        value = _json_object(text, "event and user_id")
        event, user_id = value.get("event"), value.get("user_id")
    else:
        fields = _csv_fields(text, "event,user_id")
        if len(fields) != 2:
            raise PayloadError(f"expected 'event,user_id', got {len(fields)} fields")
        event, user_id = fields
    if not isinstance(event, str) or not event or len(event) > MAX_EVENT or not event.isprintable():
        raise PayloadError(f"event must be a name of 1 to {MAX_EVENT} printable characters")
    if isinstance(user_id, str) and user_id.isdigit():
        user_id = int(user_id)
    if isinstance(user_id, bool) or not isinstance(user_id, int) or user_id < 1:
        raise PayloadError("user_id must be a positive integer")
    return Booking(event, user_id)


def parse_notification(body: bytes, limit: int) -> Notification:
    """`type,recipient` (the book's `email,foo@email.com`) or JSON with those keys and
    the booking's details."""
    text = _text(body, limit)
    if text[0] in "{[":
        value = _json_object(text, "type and recipient")
        kind, recipient = value.get("type"), value.get("recipient")
        details = {k: v for k, v in value.items() if k not in ("type", "recipient")}
    else:
        fields = _csv_fields(text, "type,recipient")
        if len(fields) != 2:
            raise PayloadError(f"expected 'type,recipient', got {len(fields)} fields")
        (kind, recipient), details = fields, {}
    if kind != "email":
        raise PayloadError(f"unsupported notification type {kind!r}: only 'email'")
    if not isinstance(recipient, str) or not EMAIL.match(recipient) or not recipient.isprintable():
        raise PayloadError("recipient must be an email address")
    return Notification(kind, recipient.lower(), details)
