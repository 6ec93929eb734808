"""The acknowledger protocol and acknowledgement of messages grouped per acknowledger."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal, Protocol, get_args, runtime_checkable

from ingest.message import Message

AckAction = Literal["ack", "reject", "reject_and_requeue", "reject_and_requeue_once"]
ACK_ACTIONS: Final[tuple[str, ...]] = get_args(AckAction)


@runtime_checkable
class Acknowledger(Protocol):
    """Settles messages with whatever delivered them (a broker channel, a test, a file).

    The pipeline calls `ack` once per group of messages that share an acknowledger, after
    their last stage, with the successful and the failed ones.
    """

    async def ack(self, successful: list[Message], failed: list[Message]) -> None: ...

    def configure(self, ack_data: Any, options: Mapping[str, Any]) -> Any:
        """Return the message's new `ack_data` for `Message.configure_ack(**options)`."""
        ...


class NoopAcknowledger:
    """Acknowledges nothing: for messages already settled by `ack_immediately`."""

    async def ack(self, successful: list[Message], failed: list[Message]) -> None:
        return None

    def configure(self, ack_data: Any, options: Mapping[str, Any]) -> Any:
        return ack_data


NOOP_ACKNOWLEDGER: Final = NoopAcknowledger()


def validate_ack_options(
    options: Mapping[str, Any], allowed: tuple[str, ...] = ACK_ACTIONS
) -> dict[str, Any]:
    """Check `on_success` / `on_failure` options against the `allowed` actions; raise
    ValueError naming what is wrong."""
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key not in ("on_success", "on_failure"):
            raise ValueError(f"unknown ack option {key!r}: use on_success or on_failure")
        if value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")
        checked[key] = value
    return checked


def group_by_acknowledger(
    successful: Iterable[Message], failed: Iterable[Message]
) -> list[tuple[Acknowledger, list[Message], list[Message]]]:
    """Split messages by acknowledger, keeping their order inside each group. Grouped by
    identity, so an acknowledger need not be hashable (a plain `@dataclass` is not)."""
    groups: dict[int, tuple[Acknowledger, tuple[list[Message], list[Message]]]] = {}
    for side, messages in ((0, successful), (1, failed)):
        # Runs of one acknowledger are the rule (a channel delivers many): no lookup for them.
        last: Acknowledger | None = None
        into: list[Message] = []
        for message in messages:
            acknowledger = message.acknowledger
            if acknowledger is not last:
                group = groups.get(id(acknowledger))
                if group is None:
                    group = groups[id(acknowledger)] = (acknowledger, ([], []))
                last, into = acknowledger, group[1][side]
            into.append(message)
    return [(acknowledger, ok, bad) for acknowledger, (ok, bad) in groups.values()]
