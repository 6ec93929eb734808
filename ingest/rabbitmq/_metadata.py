"""What of a delivery becomes `message.metadata`, chosen once from the `metadata` option."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiormq.abc import DeliveredMessage

_PROPERTY_OF = {
    "content_type": "content_type",
    "content_encoding": "content_encoding",
    "headers": "headers",
    "priority": "priority",
    "correlation_id": "correlation_id",
    "message_id": "message_id",
    "timestamp": "timestamp",
    "type": "message_type",
    "user_id": "user_id",
    "app_id": "app_id",
    "reply_to": "reply_to",
    "expiration": "expiration",
}


def metadata_reader(fields: tuple[str, ...]) -> Callable[[DeliveredMessage], dict[str, Any]]:
    """A function building the selected metadata of a delivery, decided once."""
    delivery_fields = [
        f for f in fields if f in ("delivery_tag", "redelivered", "exchange", "routing_key")
    ]
    property_fields = [(f, _PROPERTY_OF[f]) for f in fields if f in _PROPERTY_OF]
    persistent = "persistent" in fields

    def read(raw: DeliveredMessage) -> dict[str, Any]:
        delivery = raw.delivery
        properties = raw.header.properties
        metadata = {name: getattr(delivery, name) for name in delivery_fields}
        for name, attribute in property_fields:
            metadata[name] = getattr(properties, attribute)
        if persistent:
            metadata["persistent"] = properties.delivery_mode == 2
        return metadata

    return read
