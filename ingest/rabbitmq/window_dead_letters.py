"""Dead letters of durable windows: the messages of a window that failed for good,
published to a dead-letter queue as the acknowledger's dead letters are, so that `ingest
dlq` shows and replays them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ingest.message import Failed, Message
from ingest.rabbitmq.acknowledger import (
    EXCEPTION_HEADER,
    FAILED_AT_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
)
from ingest.rabbitmq.publisher import OutgoingMessage, Publisher
from ingest.text import bounded


class PublishedDeadLetters:
    """A `DeadLetterSink` (ingest.windows) publishing each message, with confirms, to
    `dead_letter_queue`: the body is the message's data (bytes and text as they are, other
    values as JSON: the payload as the pipeline stored it), the headers those it arrived
    with plus the failure, `QUEUE_HEADER` naming `queue` for a replay::

        sink = PublishedDeadLetters(publisher, "orders.dlq", "orders")
    """

    def __init__(self, publisher: Publisher, dead_letter_queue: str, queue: str) -> None:
        self.publisher = publisher
        self.dead_letter_queue = dead_letter_queue
        self.queue = queue

    async def dead_letter(self, messages: Sequence[Message]) -> None:
        """Return once the broker confirmed every one; raise (the window is kept and tried
        again) if it did not."""
        await self.publisher.publish_batch([self._outgoing(message) for message in messages])

    def _outgoing(self, message: Message) -> OutgoingMessage:
        metadata = message.metadata
        status = message.status
        reason = status.reason if isinstance(status, Failed) else "failed"
        headers = _plain(metadata.get("headers"))
        headers[REASON_HEADER] = _encodable(bounded(reason))
        if isinstance(status, Failed) and status.exception is not None:
            headers[EXCEPTION_HEADER] = type(status.exception).__qualname__
        headers[QUEUE_HEADER] = self.queue
        headers[FAILED_AT_HEADER] = int(time.time())
        message_id = metadata.get("message_id")
        data = message.data
        body = (
            data
            if isinstance(data, bytes)
            else data.encode("utf-8", "surrogateescape")
            if isinstance(data, str)
            else json.dumps(data).encode()
        )
        return OutgoingMessage(
            body,
            self.dead_letter_queue,
            message_id=(
                _short_string(message_id)
                if isinstance(message_id, str) and message_id
                else uuid.uuid4().hex
            ),
            headers=headers,
            content_type=None if isinstance(data, bytes | str) else "application/json",
        )


def _plain(headers: Any) -> dict[str, Any]:
    """Headers that always encode: a stored message's headers come back as JSON values;
    anything but text, whole numbers and booleans becomes text, so that a dead letter can
    never fail to publish and make its window loop."""
    if not isinstance(headers, Mapping):
        return {}
    plain: dict[str, Any] = {}
    for key, value in headers.items():
        if not isinstance(key, str) or len(_encodable(key).encode()) > 255:
            continue
        if isinstance(value, bool) or (isinstance(value, int) and -(2**63) <= value < 2**63):
            plain[_encodable(key)] = value
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            plain[_encodable(key)] = _encodable(text)
    return plain


def _encodable(text: str) -> str:
    """`text` with what UTF-8 cannot encode (a lone surrogate, from bytes that were not
    UTF-8) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _short_string(text: str) -> str:
    """`text`, encodable, cut to the 255 bytes of UTF-8 an AMQP short string holds (a
    longer message_id would make the publish fail, and the window loop)."""
    return _encodable(text).encode()[:255].decode("utf-8", "ignore")
