"""MemoryWindowStore: durable windows kept in a dict, for tests of the engine (it keeps
nothing across processes; `ingest.sql.SqlWindowStore` is the one to run)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from ingest.windows import Claim, OpenWindows, StoredMessage, StoredWindow, WindowRule


@dataclass(eq=False)
class _Key:
    opened_at: float
    pending: list[tuple[float, StoredMessage]] = field(default_factory=list)  # appended at


@dataclass(eq=False)
class _Closed:
    window: StoredWindow
    not_before: float = 0.0
    last_error: str | None = None


class _MemoryClaim:
    def __init__(self, windows: list[StoredWindow]) -> None:
        self._windows = windows
        self.outcomes: dict[str, tuple[float, str] | None] = {}  # None: done
        self.dead_lettered: set[str] = set()

    @property
    def windows(self) -> Sequence[StoredWindow]:
        return self._windows

    def done(self, window: StoredWindow, dead_lettered: Collection[str] = ()) -> None:
        self.outcomes[window.id] = None
        self.dead_lettered.update(dead_lettered)

    def retry(self, window: StoredWindow, not_before: float, reason: str) -> None:
        self.outcomes[window.id] = (not_before, reason)


class MemoryWindowStore:
    """The `WindowStore` contract in memory, with its claims exclusive between tasks.

    `fail_with`, when set, is raised by every call: a store that is down."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], _Key] = {}
        self._closed: dict[str, dict[str, _Closed]] = {}
        self._ids: dict[str, set[str]] = {}  # per batcher, the message ids stored
        self._held: set[str] = set()
        self.fail_with: BaseException | None = None
        self.appends = 0

    def closed_windows(self, batcher: str) -> list[StoredWindow]:
        """The closed windows of `batcher`, for tests to look at."""
        return [closed.window for closed in self._closed.get(batcher, {}).values()]

    def attempts(self, window_id: str) -> tuple[int, str | None]:
        """How many attempts of a closed window failed, and the last reason."""
        for closed in self._closed.values():
            if window_id in closed:
                entry = closed[window_id]
                return entry.window.attempts, entry.last_error
        raise KeyError(window_id)

    def _check(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    async def append(
        self, batcher: str, messages: Sequence[StoredMessage], rule: WindowRule, now: float
    ) -> int:
        self._check()
        ids = self._ids.setdefault(batcher, set())
        touched: set[tuple[str, str]] = set()
        for message in messages:
            if message.message_id is not None:
                if message.message_id in ids:
                    continue
                ids.add(message.message_id)
            key = (batcher, message.batch_key)
            entry = self._keys.get(key)
            if entry is None or not entry.pending:
                entry = self._keys[key] = _Key(now)
            entry.pending.append((now, message))
            touched.add(key)
        self.appends += 1
        return sum(len(self._keys[key].pending) >= rule.size for key in touched)

    async def close_due(self, batcher: str, rule: WindowRule, now: float, limit: int) -> int:
        self._check()
        due = sorted(
            (
                (entry.opened_at, key)
                for key, entry in self._keys.items()
                if key[0] == batcher and rule.is_due(len(entry.pending), entry.opened_at, now)
            ),
            key=lambda item: item[0],
        )[:limit]
        closed = self._closed.setdefault(batcher, {})
        for opened_at, key in due:
            entry = self._keys[key]
            members, entry.pending = entry.pending[: rule.size], entry.pending[rule.size :]
            window = StoredWindow(
                uuid.uuid4().hex,
                key[1],
                opened_at,
                rule.trigger(len(members)),
                0,
                [message for _, message in members],
            )
            closed[window.id] = _Closed(window)
            if entry.pending:  # the next window opens with the first message left
                entry.opened_at = entry.pending[0][0]
            else:
                del self._keys[key]
        return len(due)

    @asynccontextmanager
    async def claim(self, batcher: str, now: float, limit: int) -> AsyncIterator[Claim]:
        self._check()
        closed = self._closed.get(batcher, {})
        ready = sorted(
            (c for c in closed.values() if c.not_before <= now and c.window.id not in self._held),
            key=lambda c: (c.not_before, c.window.opened_at),
        )[:limit]
        claim = _MemoryClaim([c.window for c in ready])
        self._held.update(w.id for w in claim.windows)
        try:
            yield claim
            self._check()
            self._apply(closed, claim)
            self._ids.get(batcher, set()).difference_update(claim.dead_lettered)
        finally:
            self._held.difference_update(w.id for w in claim.windows)

    def _apply(self, closed: dict[str, _Closed], claim: _MemoryClaim) -> None:
        for window_id, outcome in claim.outcomes.items():
            entry = closed[window_id]
            if outcome is None:
                del closed[window_id]
                continue
            window = entry.window
            entry.window = StoredWindow(
                window.id,
                window.batch_key,
                window.opened_at,
                window.trigger,
                window.attempts + 1,
                window.messages,
            )
            entry.not_before, entry.last_error = outcome

    async def open_windows(self, batcher: str, busiest: int = 5) -> OpenWindows:
        self._check()
        keys = [(key[1], entry) for key, entry in self._keys.items() if key[0] == batcher]
        largest = sorted(keys, key=lambda item: len(item[1].pending), reverse=True)[:busiest]
        return OpenWindows(
            windows=len(keys),
            messages=sum(len(entry.pending) for _, entry in keys),
            oldest_opened_at=min((entry.opened_at for _, entry in keys), default=None),
            closed=len(self._closed.get(batcher, {})),
            busiest=[(key, len(entry.pending)) for key, entry in largest],
        )
