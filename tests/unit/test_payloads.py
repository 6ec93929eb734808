"""Parsing bookings and notifications as typed in the management UI, and the bodies of the
notifications that the bookings pipeline writes."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from pipelines.bookings import json_body
from pipelines.payloads import (
    Booking,
    Notification,
    PayloadError,
    parse_booking,
    parse_notification,
)


@pytest.mark.parametrize(
    ("body", "booking"),
    [
        (b"musical,1", Booking("musical", 1)),
        (b" cinema , 2 \n", Booking("cinema", 2)),
        (b'{"event": "cinema", "user_id": 3}', Booking("cinema", 3)),
        (b'{"event": "cinema", "user_id": "3"}', Booking("cinema", 3)),
    ],
    ids=["csv", "csv-spaces", "json", "json-string-id"],
)
def test_valid_bookings(body: bytes, booking: Booking) -> None:
    assert parse_booking(body, 1024) == booking


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"x" * 2000, "payload of 2000 bytes exceeds the limit of 1024"),
        (b"\xff\xfe,1", "payload is not valid UTF-8 (byte 0)"),
        (b"   ", "empty payload"),
        (b"a,b,c", "expected 'event,user_id', got 3 fields"),
        (b",1", "event must be a name of 1 to 100 printable characters"),
        (b"cinema,0", "user_id must be a positive integer"),
        (b'{"event": "cinema", "user_id": true}', "user_id must be a positive integer"),
        (b"{nope", "invalid JSON: Expecting property name enclosed in double quotes at position 1"),
    ],
    ids=[
        "too-big",
        "invalid-utf8",
        "blank",
        "three-fields",
        "no-event",
        "zero-user",
        "bool-user",
        "bad-json",
    ],
)
def test_invalid_bookings_say_why(body: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as error:
        parse_booking(body, 1024)
    assert str(error.value) == reason


def test_notifications_as_in_the_book_and_as_json() -> None:
    assert parse_notification(b"email,Foo@Email.com", 1024) == Notification(
        "email", "foo@email.com", {}
    )
    parsed = parse_notification(
        b'{"type": "email", "recipient": "bar@email.com", "event": "cinema"}', 1024
    )
    assert parsed.details == {"event": "cinema"}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"sms,foo@email.com", "unsupported notification type 'sms': only 'email'"),
        (b"email,not-an-address", "recipient must be an email address"),
        (b'{"type": "email"}', "recipient must be an email address"),
    ],
    ids=["sms", "bad-address", "no-recipient"],
)
def test_invalid_notifications_say_why(body: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        parse_notification(body, 1024)


def test_a_notification_body_is_its_json_and_holds_no_more_memory_than_its_size() -> None:
    value = {"type": "email", "recipient": "bar@email.com", "event": "cinema", "user_id": 1}
    assert json.loads(json_body(value)) == value
    # The batches in hand keep thousands of these: a buffer of orjson's own (about 4 KB
    # each, however short the JSON) would multiply the service's memory for them.
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        bodies = [json_body({**value, "user_id": n}) for n in range(1_000)]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(bodies) == 1_000
    assert held < 1_000 * 400
