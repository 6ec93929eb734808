"""The properties of retry and dead-letter copies, against pamqp's own encoder and decoder
(no broker)."""

from __future__ import annotations

import datetime
import decimal
from typing import Any

import pamqp.frame
import pytest
from pamqp import commands as spec
from pamqp.header import ContentHeader

from ingest.rabbitmq._copies import CopyProperties, copy_properties


def _through_the_wire(properties: spec.Basic.Properties) -> dict[str, Any]:
    """The headers as a consumer decodes them (pamqp's own decoder)."""
    frame = pamqp.frame.marshal(ContentHeader(body_size=0, properties=properties), 1)
    _, _, header = pamqp.frame.unmarshal(frame)
    assert isinstance(header, ContentHeader)
    return dict(header.properties.headers or {})


def test_headers_without_floats_are_encoded_as_pamqp_encodes_them() -> None:
    headers = {
        "text": "été",
        "count": 70000,
        "negative": -5,
        "flag": True,
        "none": None,
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "price": decimal.Decimal("19.99"),
        "blob": bytearray(b"\x00\xff"),
        "nested": {"list": [1, "two", {"three": 3}]},
    }
    assert CopyProperties(headers=headers).marshal() == (
        spec.Basic.Properties(headers=headers).marshal()
    )


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(19.99, id="float"),
        pytest.param(1e300, id="float-too-large-for-32-bits"),
        pytest.param(5e-324, id="smallest-double"),
        pytest.param({"total": 19.99, "lines": [0.1, {"tax": 0.2}]}, id="nested-table"),
        pytest.param([19.99, [0.3], []], id="nested-array"),
        pytest.param(2**63 - 1, id="long-long"),
        pytest.param(decimal.Decimal("-1.5"), id="decimal"),
    ],
)
def test_every_header_value_arrives_exactly_as_it_was(value: Any) -> None:
    original = spec.Basic.Properties(headers={"value": value})
    properties, problems = copy_properties(original, {"value": value})
    assert problems == []
    assert _through_the_wire(properties) == {"value": value}


def test_a_long_string_that_is_not_utf8_is_copied_as_a_byte_array_and_said() -> None:
    headers = {"raw": b"\xff\xfe", "nested": {"deep": [b"\x80"]}, "kept": "ok"}
    properties, problems = copy_properties(spec.Basic.Properties(), headers)
    assert _through_the_wire(properties) == {
        "raw": bytearray(b"\xff\xfe"),
        "nested": {"deep": [bytearray(b"\x80")]},
        "kept": "ok",
    }
    assert problems == [
        "'raw' held a long string that is not UTF-8; copied as a byte array",
        "'nested' held a long string that is not UTF-8; copied as a byte array",
    ]


def test_a_header_that_cannot_be_encoded_at_all_is_left_out_and_said() -> None:
    too_precise = decimal.Decimal("1.2345678901234567890")  # mantissa beyond 32 bits
    properties, problems = copy_properties(
        spec.Basic.Properties(message_id="m-1"), {"amount": too_precise, "kept": 1}
    )
    assert _through_the_wire(properties) == {"kept": 1}
    assert properties.message_id == "m-1"
    assert len(problems) == 1
    assert problems[0].startswith("'amount' is left out (")


# Strings the fast path decoded with surrogate escapes (they were not UTF-8): a copy cannot
# carry them, so each is left out and named, and the rest of the copy is exact.


def test_a_header_name_that_is_not_utf8_is_left_out_and_said() -> None:
    headers = {"x-\udcff": "v", "kept": "ok"}
    original = spec.Basic.Properties(message_id="m-1", content_type="text/csv")
    properties, problems = copy_properties(original, headers)
    assert _through_the_wire(properties) == {"kept": "ok"}
    assert (properties.message_id, properties.content_type) == ("m-1", "text/csv")
    assert problems == ["header name 'x-\\udcff' is not UTF-8; the header is left out"]


def test_a_message_id_that_is_not_utf8_is_left_out_and_said() -> None:
    original = spec.Basic.Properties(
        message_id="\udcffm-1", correlation_id="c-\udc80", content_type="text/csv", app_id="a"
    )
    properties, problems = copy_properties(original, {"kept": "ok"})
    assert _through_the_wire(properties) == {"kept": "ok"}
    assert (properties.message_id, properties.correlation_id) == (None, None)
    assert (properties.content_type, properties.app_id) == ("text/csv", "a")
    assert problems == [
        "correlation_id 'c-\\udc80' is not UTF-8; left out of the copy",
        "message_id '\\udcffm-1' is not UTF-8; left out of the copy",
    ]


def test_a_nested_header_name_that_is_not_utf8_leaves_its_header_out_and_said() -> None:
    headers = {"order": {"x-\udcff": 1}, "kept": "ok"}
    properties, problems = copy_properties(spec.Basic.Properties(), headers)
    assert _through_the_wire(properties) == {"kept": "ok"}
    assert len(problems) == 1
    assert problems[0].startswith("'order' is left out (")


def test_the_problems_are_printable_and_encodable_as_a_header() -> None:
    original = spec.Basic.Properties(message_id="\udcff")
    properties, problems = copy_properties(original, {"\udcfe": 1})
    reason = "; ".join(problems)
    properties.headers = {"x-ingest-reason": reason}
    assert _through_the_wire(properties) == {"x-ingest-reason": reason}
