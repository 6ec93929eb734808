"""The message that travels through a pipeline, and its status."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from ingest.text import bounded

if TYPE_CHECKING:
    from ingest.acknowledger import Acknowledger

BatchMode = Literal["bulk", "flush"]

DEFAULT_BATCHER: Final = "default"
DEFAULT_BATCH_KEY: Final = "default"


@dataclass(frozen=True, slots=True)
class Ok:
    """The status of a message nothing has failed yet."""

    def __repr__(self) -> str:
        return "OK"


OK: Final = Ok()


@dataclass(frozen=True, slots=True)
class Failed:
    """A message marked failed on purpose, by `Message.failed(reason)` or by the engine.

    `reason` is what dead letters, logs and metrics show; `exception` is set when an
    exception caused the failure. A reason may quote what arrived (a 65,000-character
    field), and every view of the failure repeats it: it is kept `bounded` (500
    characters at most, the cut marked with how much was left out).
    """

    reason: str
    exception: BaseException | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", bounded(self.reason))


Status = Ok | Failed


class Message:
    """One message: its data, its metadata and how it is to be acknowledged.

    The helpers change the message in place and return it, so a handler can chain them::

        return message.update_data(parse).put_batcher("express").put_batch_key(user_id)
    """

    # `__weakref__`: instrumentation keeps what it knows of a message (its trace span)
    # beside it, for as long as the message lives, and no longer.
    __slots__ = (
        "__weakref__",
        "ack_data",
        "acknowledger",
        "batch_key",
        "batch_mode",
        "batcher",
        "data",
        "metadata",
        "status",
    )

    def __init__(
        self,
        data: Any,
        acknowledger: Acknowledger,
        *,
        ack_data: Any = None,
        metadata: dict[str, Any] | None = None,
        batcher: str = DEFAULT_BATCHER,
        batch_key: Any = DEFAULT_BATCH_KEY,
        batch_mode: BatchMode = "bulk",
    ) -> None:
        self.data = data
        self.metadata: dict[str, Any] = {} if metadata is None else metadata
        self.acknowledger = acknowledger
        self.ack_data = ack_data
        self.batcher = batcher
        self.batch_key = batch_key
        self.batch_mode: BatchMode = batch_mode
        self.status: Status = OK

    def __repr__(self) -> str:
        return (
            f"Message(data={self.data!r}, status={self.status!r}, batcher={self.batcher!r}, "
            f"batch_key={self.batch_key!r})"
        )

    @property
    def is_ok(self) -> bool:
        return self.status is OK

    @property
    def failure_reason(self) -> str | None:
        """The reason of a failed message, `None` for a successful one."""
        status = self.status
        return status.reason if isinstance(status, Failed) else None

    def update_data(self, fun: Callable[[Any], Any]) -> Message:
        """Replace the data with `fun(data)`."""
        self.data = fun(self.data)
        return self

    def put_data(self, data: Any) -> Message:
        self.data = data
        return self

    def put_batcher(self, batcher: str) -> Message:
        """Send the message to the named batcher (it must be declared in the pipeline)."""
        self.batcher = batcher
        return self

    def put_batch_key(self, batch_key: Any) -> Message:
        """Group the message with others of the same key inside its batcher."""
        self.batch_key = batch_key
        return self

    def put_batch_mode(self, batch_mode: BatchMode) -> Message:
        """`"flush"` closes the message's batch as soon as the message joins it."""
        if batch_mode not in ("bulk", "flush"):
            raise ValueError(f"batch_mode must be 'bulk' or 'flush', not {batch_mode!r}")
        self.batch_mode = batch_mode
        return self

    def failed(self, reason: str) -> Message:
        """Mark the message failed: it skips the batchers and goes to `handle_failed`."""
        self.status = Failed(str(reason))
        return self

    def configure_ack(self, **options: Any) -> Message:
        """Change how this message is acknowledged, e.g. `on_failure="reject_and_requeue"`.

        The options are validated by the message's acknowledger.
        """
        self.ack_data = self.acknowledger.configure(self.ack_data, options)
        return self

    async def ack_immediately(self) -> Message:
        """Acknowledge the message now; the pipeline will not acknowledge it again."""
        from ingest.acknowledger import NOOP_ACKNOWLEDGER

        if self.is_ok:
            await self.acknowledger.ack([self], [])
        else:
            await self.acknowledger.ack([], [self])
        self.acknowledger = NOOP_ACKNOWLEDGER
        return self


def fail_with_exception(message: Message, exc: BaseException, where: str) -> None:
    """Mark `message` failed because `where` raised `exc`."""
    message.status = Failed(f"{where} raised {type(exc).__name__}: {exc}", exc)
