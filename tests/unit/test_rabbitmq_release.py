"""The copy of a released delivery (the circuit breaker hands back what raised while it
was open or probing): its headers exactly as they came, its attempt count unchanged; one
that cannot be copied exactly is not released (no broker)."""

from __future__ import annotations

from pamqp import commands as spec

from ingest.rabbitmq import ATTEMPTS_HEADER
from ingest.rabbitmq._copies import release_properties


def test_a_released_copy_keeps_every_header_and_the_attempt_count() -> None:
    headers = {ATTEMPTS_HEADER: 2, "price": 19.99, "trace": {"id": "abc"}}
    original = spec.Basic.Properties(headers=headers, message_id="m-1", content_type="text/csv")
    released = release_properties(original)
    assert released is not None
    assert released.headers == headers
    assert (released.message_id, released.content_type) == ("m-1", "text/csv")
    assert released.delivery_mode == 2  # persistent, as every copy
    released.marshal()  # encodable as it is


def test_a_delivery_that_cannot_be_copied_exactly_is_not_released() -> None:
    original = spec.Basic.Properties(headers={"raw": b"\xff\xfe"})  # not UTF-8
    assert release_properties(original) is None
