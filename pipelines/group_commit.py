"""Group commit: writes that arrive while one transaction commits go together in the next.

SQLite has one writer at a time and syncs its log on every commit, so concurrent batch
processors each committing their own INSERT wait in line for one fsync each. Gathered, the
writes of every batch that arrived meanwhile share one transaction and one fsync (what
PostgreSQL's server does on its own)::

    writes = GroupCommit(run_in_one_transaction)
    await writes.write(sql, parameters)  # returns once committed, or raises its error
    await writes.close()                 # at shutdown: waits for what is being committed
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

Statement = tuple[str, Any]  # SQL and its parameters


class GroupCommit:
    def __init__(self, run: Callable[[Sequence[Statement]], Awaitable[None]]) -> None:
        """`run` executes statements in order in one transaction and commits it."""
        self._run = run
        self._waiting: list[tuple[Statement, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None

    async def write(self, sql: str, parameters: Any) -> None:
        """Commit this statement with whatever else is waiting. A caller cancelled
        meanwhile stops waiting; its statement may still be committed (each one here is
        idempotent, and so would it be on a direct call cancelled mid-commit)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(((sql, parameters), future))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_waiting(), name="group commit")
        await future

    async def close(self) -> None:
        """Wait for the writes already handed over (the committer ends once none wait)."""
        if self._committer is not None:
            await asyncio.shield(self._committer)

    async def _commit_waiting(self) -> None:
        group: list[tuple[Statement, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                await self._commit(group)
        finally:
            self._committer = None
            # Only when cancelled (the event loop closing) does anyone still wait: say so.
            for _, future in [*group, *self._waiting]:
                _settle(future, ConnectionError("the database writer was stopped"))
            self._waiting = []

    async def _commit(self, group: list[tuple[Statement, asyncio.Future[None]]]) -> None:
        """One transaction for the group; if it fails, each statement alone, so that
        each caller gets its own statement's outcome."""
        try:
            await self._run([statement for statement, _ in group])
        except Exception as error:
            if len(group) == 1:
                _settle(group[0][1], error)
                return
            for statement, future in group:
                try:
                    await self._run([statement])
                except Exception as own:
                    _settle(future, own)
                else:
                    _settle(future, None)
        else:
            for _, future in group:
                _settle(future, None)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # its caller was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
