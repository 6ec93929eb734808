"""The digest email: every notification listed with its reference, readable as sent."""

from __future__ import annotations

import email
from email import policy

from pipelines.mail import digest
from pipelines.payloads import Notification


def sent(recipient: str, events: list[str]) -> email.message.EmailMessage:
    notifications = [
        (f"b-{i}/notification", Notification("email", recipient, {"event": event}))
        for i, event in enumerate(events)
    ]
    raw = digest("ingest@example.com", recipient, notifications).data
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def test_an_ascii_digest_is_plain_text_with_one_line_per_notification() -> None:
    message = sent("foo@email.com", ["cinema", "musical"])
    assert message["To"] == "foo@email.com"
    assert message["Subject"] == "Your 2 ticket notifications"
    assert message["Content-Transfer-Encoding"] == "7bit"
    body = message.get_content()
    assert "- your cinema ticket is booked (ref b-0/notification)" in body
    assert "- your musical ticket is booked (ref b-1/notification)" in body


def test_non_ascii_text_is_encoded_and_reads_back_the_same() -> None:
    message = sent("jö@email.com", ["kinö"])
    assert "jö@email.com" in message["To"]  # RFC 2047, decoded (and quoted) on reading
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert "- your kinö ticket is booked (ref b-0/notification)" in message.get_content()
