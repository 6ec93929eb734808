"""GroupCommit: writes that wait while one commits share the next transaction; a failed
group gives each statement its own outcome; nobody is left waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from pipelines.group_commit import GroupCommit, Statement


class Transactions:
    """Records each transaction's statements; fails those holding a statement `bad`."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.committed: list[list[str]] = []

    async def run(self, statements: Sequence[Statement]) -> None:
        await asyncio.sleep(self.delay)
        sqls = [sql for sql, _ in statements]
        if "bad" in sqls:
            raise ValueError("constraint failed")
        self.committed.append(sqls)


async def test_writes_arriving_during_a_commit_share_the_next_one() -> None:
    transactions = Transactions()
    writes = GroupCommit(transactions.run)
    first = asyncio.create_task(writes.write("a", ()))
    await asyncio.sleep(0)  # "a" is being committed alone
    await asyncio.gather(first, *(writes.write(sql, ()) for sql in "bcd"))
    assert transactions.committed == [["a"], ["b", "c", "d"]]
    await writes.close()


async def test_a_failed_group_gives_each_statement_its_own_outcome() -> None:
    transactions = Transactions()
    writes = GroupCommit(transactions.run)
    first = asyncio.create_task(writes.write("a", ()))
    await asyncio.sleep(0)
    outcomes = await asyncio.gather(
        first, *(writes.write(sql, ()) for sql in ("b", "bad", "c")), return_exceptions=True
    )
    assert [outcomes[i] for i in (0, 1, 3)] == [None, None, None]
    assert isinstance(outcomes[2], ValueError)
    assert transactions.committed == [["a"], ["b"], ["c"]]


async def test_a_cancelled_caller_does_not_stop_the_others() -> None:
    transactions = Transactions(delay=0.05)
    writes = GroupCommit(transactions.run)
    first = asyncio.create_task(writes.write("a", ()))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(writes.write(sql, ())) for sql in "bc"]
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.gather(*waiting)
    assert transactions.committed == [["a"], ["b", "c"]]  # "a" was already committing
    await writes.close()


async def test_close_waits_for_what_was_handed_over() -> None:
    transactions = Transactions()
    writes = GroupCommit(transactions.run)
    task = asyncio.create_task(writes.write("a", ()))
    await asyncio.sleep(0)
    await writes.close()
    assert transactions.committed == [["a"]]
    await task


async def test_callers_of_a_stopped_committer_get_an_error_not_a_hang() -> None:
    transactions = Transactions(delay=10)
    writes = GroupCommit(transactions.run)
    task = asyncio.create_task(writes.write("a", ()))
    await asyncio.sleep(0.01)
    committer = writes._committer
    assert committer is not None
    committer.cancel()
    with pytest.raises(ConnectionError, match="stopped"):
        await asyncio.wait_for(task, 1)
