"""Deadline: handle_message's timeout with one timer per chunk, not one per message."""

from __future__ import annotations

import asyncio

from ingest.exceptions import HandlerTimeout


class Deadline:
    """Times the `handle_message` calls of one chunk, one after the other.

    `asyncio.timeout` per message schedules and cancels a timer for every message. Here one
    timer is armed for the first message; when it fires and the message running then
    started later, it is moved to that message's own deadline; only a message that really
    ran `seconds` is cancelled. With handlers that finish in time, a chunk costs one timer.
    """

    __slots__ = ("_handle", "_loop", "_running", "_seconds", "_started", "_task", "expired")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "a Deadline is made inside the stage's task"
        self._task = task
        self._handle: asyncio.TimerHandle | None = None
        self._started = 0.0
        self._running = False
        self.expired = False

    def begin(self) -> None:
        """A handler starts now."""
        self._started = self._loop.time()
        self._running = True
        if self._handle is None:
            self._handle = self._loop.call_at(self._started + self._seconds, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if not self._running:
            return
        due = self._started + self._seconds
        if self._loop.time() >= due:
            self.expired = True
            self._task.cancel()
        else:  # armed for an earlier message: move it to the running one's deadline
            self._handle = self._loop.call_at(due, self._fire)

    def end(self, error: BaseException | None) -> BaseException | None:
        """The handler ended, with `error` or None; what to treat it as: `HandlerTimeout`
        in place of the CancelledError this deadline caused, else `error` itself (a
        cancellation of the stage stays one, as `asyncio.timeout` does it)."""
        self._running = False
        if not self.expired:
            return error
        self.expired = False
        if self._task.uncancel() == 0 and isinstance(error, asyncio.CancelledError):
            return HandlerTimeout(f"timed out after {self._seconds:g}s")
        return error

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
