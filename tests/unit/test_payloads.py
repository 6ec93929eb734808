"""Parsing bookings and notifications as typed in the management UI."""

from __future__ import annotations

import pytest

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
