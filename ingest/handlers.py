"""Handlers: the hooks a pipeline's author writes, with Broadway's defaults."""

from __future__ import annotations

from typing import Any

from ingest.batch_info import BatchInfo
from ingest.message import Message


class Handlers:
    """Subclass and override the hooks your pipeline needs; `handle_message` is required,
    and `handle_batch` too when the pipeline declares batchers::

        class Uppercase(Handlers):
            async def handle_message(self, processor, message, context):
                return message.update_data(str.upper)

    An exception (or a wrong return value) fails the message in `handle_message`, the
    whole chunk in `prepare_messages` and the whole batch in `handle_batch`.
    """

    async def prepare_messages(self, messages: list[Message], context: Any) -> list[Message]:
        """Prepare a chunk before `handle_message` runs on each (e.g. one query for all).

        Must return a list of the same length.
        """
        return messages

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        """Process one message; route it with `put_batcher` / `put_batch_key`."""
        raise NotImplementedError(f"{type(self).__name__} must define handle_message")

    async def handle_batch(
        self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
    ) -> list[Message]:
        """Process one batch; return its messages (missing ones are failed and acked)."""
        raise NotImplementedError(f"{type(self).__name__} must define handle_batch")

    async def handle_failed(self, messages: list[Message], context: Any) -> list[Message]:
        """See messages that failed before they are acknowledged (e.g. `configure_ack`).

        Must return a list of the same length; it runs in the stage where they failed.
        """
        return messages


def overrides(handlers: Handlers, hook: str) -> bool:
    """Whether `handlers` defines its own `hook` rather than the base class's."""
    return getattr(type(handlers), hook) is not getattr(Handlers, hook)
