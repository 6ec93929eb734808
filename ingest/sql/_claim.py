"""HeldWindows: the `Claim` both dialects hand out, with the outcomes recorded on it."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ingest.batch_info import BatchTrigger
from ingest.windows import StoredWindow

__all__ = ["HeldWindows", "Retry", "trigger_of"]


@dataclass(frozen=True, slots=True)
class Retry:
    window_id: str
    not_before: float
    reason: str


class HeldWindows:
    """The windows of one claim and what became of them. Outcomes stay in memory until
    the claim's context exits normally, when the store applies them together: a claim
    left by an exception applies none, so its windows come back unchanged."""

    def __init__(self, windows: Sequence[StoredWindow]) -> None:
        self._windows = windows
        self._ids = {window.id for window in windows}
        # By window id, the last outcome given: None for done.
        self._outcomes: dict[str, Retry | None] = {}
        self._dead_lettered: set[str] = set()

    @property
    def windows(self) -> Sequence[StoredWindow]:
        return self._windows

    def done(self, window: StoredWindow, dead_lettered: Collection[str] = ()) -> None:
        self._outcomes[self._held(window)] = None
        self._dead_lettered.update(dead_lettered)

    def retry(self, window: StoredWindow, not_before: float, reason: str) -> None:
        window_id = self._held(window)
        self._outcomes[window_id] = Retry(window_id, not_before, reason)

    @property
    def done_ids(self) -> list[str]:
        return [window_id for window_id, outcome in self._outcomes.items() if outcome is None]

    @property
    def dead_lettered(self) -> list[str]:
        """The ids of done windows' messages not to remember (they were dead-lettered)."""
        return sorted(self._dead_lettered)

    @property
    def retries(self) -> list[Retry]:
        return [outcome for outcome in self._outcomes.values() if outcome is not None]

    def _held(self, window: StoredWindow) -> str:
        # Another claim's window would be changed while that claim still holds it.
        if window.id not in self._ids:
            raise ValueError(
                f"window {window.id!r} is not held by this claim: give outcomes only to "
                "the windows of the claim they come from"
            )
        return window.id


def trigger_of(stored: str) -> BatchTrigger:
    """The trigger column's text as the contract types it."""
    return "size" if stored == "size" else "timeout"
