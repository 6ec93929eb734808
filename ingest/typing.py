"""Protocols for the callables users hand to a pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ingest.events import Event
    from ingest.message import Message


class PartitionBy(Protocol):
    """Maps a message to a non-negative int; equal ints keep their order end to end."""

    def __call__(self, message: Message, /) -> int: ...


class SizeStep(Protocol):
    """One step of a custom batch size: `(emit_now, new_accumulator)` for a joining message.

    When `emit_now` is true the batch closes with this message in it and the accumulator
    starts again from the initial value.
    """

    def __call__(self, message: Message, acc: Any, /) -> tuple[bool, Any]: ...


class EventHandler(Protocol):
    """Receives instrumentation events; must be quick and must not block."""

    def __call__(self, event: Event, /) -> None: ...
