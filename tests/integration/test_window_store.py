"""SqlWindowStore keeps the WindowStore contract on SQLite and PostgreSQL: windows close
by size and by timeout with their members in append order, redeliveries are skipped,
claims are exclusive (between tasks, and between processes: row locks on PostgreSQL, the
flush lock on SQLite), outcomes apply only when a claim ends normally, and replicas
closing at once put every message in exactly one window."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from ingest.sql import SqlWindowStore
from ingest.windows import OpenWindows, StoredMessage, StoredWindow, WindowRule, WindowStore
from tests.support import eventually, postgres_through_a_proxy

T0 = 1_700_000_000.0
RULE = WindowRule(size=75, timeout=10.0)
BATCHER = "digests"

MakeStore = Callable[..., Awaitable[SqlWindowStore]]


@pytest.fixture
async def make_store(database_url: str) -> AsyncIterator[MakeStore]:
    """Started stores on the test's database, each with its own engine (as separate
    processes would have); all closed after the test."""
    stores: list[SqlWindowStore] = []

    async def make(url: str = database_url, **options: Any) -> SqlWindowStore:
        store = SqlWindowStore(url, **options)
        stores.append(store)
        await store.start()
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> SqlWindowStore:
    return await make_store()


def messages(key: str, ids: Sequence[int], prefix: str = "m") -> list[StoredMessage]:
    return [
        StoredMessage(key, json.dumps({"n": i}), json.dumps({"i": i}), f"{prefix}{i}") for i in ids
    ]


def ids_of(window: StoredWindow) -> list[str | None]:
    return [message.message_id for message in window.messages]


async def claim_all(store: WindowStore, now: float = T0 + 3600, limit: int = 100) -> list[str]:
    """The ids of the windows a claim gets, leaving them closed."""
    async with store.claim(BATCHER, now, limit) as claim:
        return [window.id for window in claim.windows]


async def flush_all(store: WindowStore, now: float = T0 + 3600) -> list[StoredWindow]:
    """Claim every ready window, a few at a time, and complete each."""
    flushed: list[StoredWindow] = []
    while True:
        async with store.claim(BATCHER, now, 20) as claim:
            for window in claim.windows:
                claim.done(window)
            flushed.extend(claim.windows)
        if not claim.windows:
            return flushed


def is_postgresql(store: SqlWindowStore) -> bool:
    return store.engine.dialect.name == "postgresql"


async def test_a_store_implements_the_contract(store: SqlWindowStore) -> None:
    assert isinstance(store, WindowStore)


async def test_a_full_window_closes_and_the_rest_opens_the_next(store: SqlWindowStore) -> None:
    assert await store.append(BATCHER, messages("k", range(60)), RULE, T0) == 0
    assert await store.append(BATCHER, messages("k", range(60, 80)), RULE, T0 + 1) == 1

    assert await store.close_due(BATCHER, RULE, T0 + 2, limit=10) == 1

    assert await store.open_windows(BATCHER) == OpenWindows(
        windows=1, messages=5, oldest_opened_at=T0 + 1, closed=1, busiest=(("k", 5),)
    )
    async with store.claim(BATCHER, T0 + 2, 10) as claim:
        [window] = claim.windows
    assert (window.batch_key, window.opened_at, window.trigger, window.attempts) == (
        "k",
        T0,
        "size",
        0,
    )
    assert ids_of(window) == [f"m{i}" for i in range(75)]


async def test_a_window_not_full_closes_once_its_timeout_passed(store: SqlWindowStore) -> None:
    await store.append(BATCHER, messages("k", range(3)), RULE, T0)
    await store.append(BATCHER, messages("k", range(3, 5)), RULE, T0 + 4)

    assert await store.close_due(BATCHER, RULE, T0 + 9.5, limit=10) == 0
    assert await store.close_due(BATCHER, RULE, T0 + 10, limit=10) == 1

    async with store.claim(BATCHER, T0 + 10, 10) as claim:
        [window] = claim.windows
    assert (window.opened_at, window.trigger, ids_of(window)) == (
        T0,
        "timeout",
        ["m0", "m1", "m2", "m3", "m4"],
    )
    assert (await store.open_windows(BATCHER)).windows == 0


async def test_a_key_emptied_by_a_close_opens_anew_at_its_next_append(
    store: SqlWindowStore,
) -> None:
    await store.append(BATCHER, messages("k", range(3)), RULE, T0)
    await store.close_due(BATCHER, RULE, T0 + 10, limit=10)

    await store.append(BATCHER, messages("k", range(3, 4)), RULE, T0 + 50)

    assert (await store.open_windows(BATCHER)).oldest_opened_at == T0 + 50
    assert await store.close_due(BATCHER, RULE, T0 + 59, limit=10) == 0


async def test_append_returns_how_many_touched_keys_are_due_by_size(
    store: SqlWindowStore,
) -> None:
    rule = WindowRule(size=3, timeout=10.0)
    first = messages("a", range(3)) + messages("b", range(3, 5)) + messages("c", range(5, 9))
    assert await store.append(BATCHER, first, rule, T0) == 2  # a (3) and c (4)
    # Only the keys this append touches count: b reaches 3, a (still due) is not touched.
    assert await store.append(BATCHER, messages("b", range(9, 10)), rule, T0) == 1


async def test_due_keys_close_oldest_first_up_to_the_limit(store: SqlWindowStore) -> None:
    for n, key in enumerate(["c", "a", "b"]):
        await store.append(BATCHER, messages(key, [n]), RULE, T0 + n)

    assert await store.close_due(BATCHER, RULE, T0 + 100, limit=2) == 2

    async with store.claim(BATCHER, T0 + 100, 10) as claim:
        assert [window.batch_key for window in claim.windows] == ["c", "a"]
    assert (await store.open_windows(BATCHER)).busiest == (("b", 1),)


async def test_a_message_id_already_stored_is_skipped_and_counted_nowhere(
    store: SqlWindowStore,
) -> None:
    rule = WindowRule(size=4, timeout=10.0)
    await store.append(BATCHER, messages("k", [1, 2]), rule, T0)
    # A redelivery of m2, m3 twice in one chunk, and two messages without an id.
    again = [
        *messages("k", [2, 3, 3]),
        StoredMessage("k", "1", "{}"),
        StoredMessage("k", "2", "{}"),
    ]
    assert await store.append(BATCHER, again, rule, T0 + 1) == 1

    assert (await store.open_windows(BATCHER)).messages == 5
    # One window per key at a time: the first of four, then the one left.
    assert await store.close_due(BATCHER, rule, T0 + 100, limit=10) == 1
    assert await store.close_due(BATCHER, rule, T0 + 100, limit=10) == 1
    windows = await flush_all(store)
    assert [ids_of(window) for window in windows] == [["m1", "m2", "m3", None], [None]]
    assert [message.data for message in windows[0].messages[3:] + windows[1].messages] == [
        "1",
        "2",
    ]


async def test_a_message_id_done_not_long_ago_joins_no_second_window(
    make_store: MakeStore,
) -> None:
    store = await make_store(remember_done=60.0)
    rule = WindowRule(size=2, timeout=10.0)
    await store.append(BATCHER, messages("k", [1, 2]), rule, T0)
    await store.close_due(BATCHER, rule, T0, limit=10)
    assert len(await flush_all(store)) == 1
    # Redelivered after its window was mailed: skipped; a new one is not.
    assert await store.append(BATCHER, messages("k", [2, 3]), rule, T0 + 1) == 0
    assert (await store.open_windows(BATCHER)).messages == 1


async def test_a_dead_lettered_message_id_is_not_remembered_so_its_replay_gets_in(
    store: SqlWindowStore,
) -> None:
    rule = WindowRule(size=2, timeout=10.0)
    await store.append(BATCHER, messages("k", [1, 2]), rule, T0)
    await store.close_due(BATCHER, rule, T0, limit=10)
    async with store.claim(BATCHER, T0, 10) as claim:
        claim.done(claim.windows[0], dead_lettered={"m2"})
    assert await store.append(BATCHER, messages("k", [1, 2]), rule, T0 + 1) == 0
    async with store.engine.connect() as connection:
        left = await connection.exec_driver_sql("SELECT message_id FROM ingest_window_messages")
        assert [row[0] for row in left] == ["m2"]


async def test_done_message_ids_are_forgotten_after_remember_done(
    make_store: MakeStore,
) -> None:
    store = await make_store(remember_done=1.0)
    rule = WindowRule(size=1, timeout=10.0)
    await store.append(BATCHER, messages("k", [1]), rule, time.time())
    await store.close_due(BATCHER, rule, time.time(), limit=10)
    await flush_all(store, now=time.time())
    await asyncio.sleep(1.1)
    # The first close of a store forgets what is older than remember_done.
    fresh = await make_store(remember_done=1.0)
    await fresh.close_due(BATCHER, rule, time.time(), limit=10)
    assert await fresh.append(BATCHER, messages("k", [1]), rule, time.time()) == 1


async def test_batchers_sharing_a_store_keep_apart(store: SqlWindowStore) -> None:
    rule = WindowRule(size=2, timeout=10.0)
    await store.append("other", messages("k", [1, 2]), rule, T0)

    # The same message ids for another batcher are not duplicates.
    assert await store.append(BATCHER, messages("k", [1]), rule, T0) == 0

    assert await store.close_due(BATCHER, rule, T0 + 1, limit=10) == 0
    assert await store.close_due("other", rule, T0 + 1, limit=10) == 1
    assert await claim_all(store) == []
    assert (await store.open_windows(BATCHER)).messages == 1


async def test_members_come_back_in_append_order_with_their_data_and_metadata(
    store: SqlWindowStore,
) -> None:
    rule = WindowRule(size=6, timeout=10.0)
    odd = ['{"text": "é \\" \\u0000 <b>"}', json.dumps({"big": "x" * 100_000}), "null"]
    sent: dict[str, list[StoredMessage]] = {"a": [], "b": []}
    for chunk in range(3):
        batch = []
        for key in ("a", "b"):
            data = odd[chunk] if key == "a" else json.dumps([chunk])
            message = StoredMessage(key, data, json.dumps({"chunk": chunk, "key": key}), None)
            batch += [message, StoredMessage(key, "0", "{}", f"{key}{chunk}")]
        await store.append(BATCHER, batch, rule, T0 + chunk)
        for message in batch:
            sent[message.batch_key].append(message)

    await store.close_due(BATCHER, rule, T0 + 5, limit=10)

    async with store.claim(BATCHER, T0 + 5, 10) as claim:
        members = {window.batch_key: list(window.messages) for window in claim.windows}
    assert members == sent


async def test_a_window_done_is_gone_with_its_messages(store: SqlWindowStore) -> None:
    await store.append(BATCHER, messages("k", range(75)), RULE, T0)
    await store.close_due(BATCHER, RULE, T0, limit=10)

    async with store.claim(BATCHER, T0, 10) as claim:
        claim.done(claim.windows[0])

    assert await claim_all(store) == []
    assert await store.open_windows(BATCHER) == OpenWindows()
    async with store.engine.connect() as connection:
        left = await connection.exec_driver_sql("SELECT count(*) FROM ingest_window_messages")
        assert left.scalar_one() == 0


async def test_a_retried_window_counts_an_attempt_and_waits_until_not_before(
    store: SqlWindowStore,
) -> None:
    await store.append(BATCHER, messages("k", range(75)), RULE, T0)
    await store.close_due(BATCHER, RULE, T0, limit=10)
    async with store.claim(BATCHER, T0, 10) as claim:
        [first] = claim.windows
        claim.retry(first, T0 + 30, "SMTP 451: try later")

    assert await claim_all(store, now=T0 + 29.9) == []
    async with store.claim(BATCHER, T0 + 30, 10) as claim:
        [again] = claim.windows
    assert (again.id, again.attempts, again.messages) == (first.id, 1, first.messages)
    async with store.engine.connect() as connection:
        error = await connection.exec_driver_sql("SELECT last_error FROM ingest_window_windows")
        assert error.scalar_one() == "SMTP 451: try later"


async def test_windows_retried_later_are_claimed_after_those_ready_first(
    store: SqlWindowStore,
) -> None:
    rule = WindowRule(size=1, timeout=10.0)
    for n in range(3):
        await store.append(BATCHER, messages(f"k{n}", [n]), rule, T0 + n)
    await store.close_due(BATCHER, rule, T0 + 3, limit=10)
    async with store.claim(BATCHER, T0 + 3, 1) as claim:
        claim.retry(claim.windows[0], T0 + 5, "later")

    async with store.claim(BATCHER, T0 + 5, 10) as claim:
        assert [window.batch_key for window in claim.windows] == ["k1", "k2", "k0"]


@pytest.mark.parametrize("leave", ["exception", "cancellation"])
async def test_a_claim_left_abruptly_applies_nothing_and_gives_its_windows_back(
    store: SqlWindowStore, leave: str
) -> None:
    await store.append(BATCHER, messages("a", range(75)) + messages("b", range(75, 78)), RULE, T0)
    assert await store.close_due(BATCHER, RULE, T0 + 10, limit=10) == 2
    inside = asyncio.Event()
    held: list[StoredWindow] = []

    async def flush() -> None:
        async with store.claim(BATCHER, T0 + 10, 10) as claim:
            held.extend(claim.windows)
            claim.done(claim.windows[0])
            claim.retry(claim.windows[1], T0 + 100, "no")
            inside.set()
            if leave == "exception":
                raise RuntimeError("handle_batch failed")
            await asyncio.sleep(60)

    task = asyncio.create_task(flush())
    await asyncio.wait_for(inside.wait(), 10)
    if leave == "cancellation":
        task.cancel()
    with pytest.raises(RuntimeError if leave == "exception" else asyncio.CancelledError):
        await task

    async with store.claim(BATCHER, T0 + 10, 10) as claim:
        again = list(claim.windows)
    assert [(w.id, w.attempts, w.messages) for w in again] == [(w.id, 0, w.messages) for w in held]
    assert len(again) == 2


async def test_an_outcome_for_a_window_of_another_claim_is_refused(
    store: SqlWindowStore,
) -> None:
    stranger = StoredWindow("not-claimed", "k", T0, "size", 0, [])
    async with store.claim(BATCHER, T0, 10) as claim:
        with pytest.raises(ValueError, match="not held by this claim"):
            claim.done(stranger)


async def closed_windows(store: SqlWindowStore, count: int) -> None:
    """`count` closed windows of one message each, keys w00, w01, ..."""
    rule = WindowRule(size=1, timeout=10.0)
    for n in range(count):
        await store.append(BATCHER, messages(f"w{n:02d}", [n]), rule, T0 + n)
    assert await store.close_due(BATCHER, rule, T0 + count, limit=count) == count


async def hold_together(
    first: WindowStore, second: WindowStore, limit: int
) -> tuple[list[str], list[str]]:
    """What two claims get while both are open at once: the first still holds its
    windows while the second claims (within 5 s: it skips them, never waits)."""
    first_in, second_done = asyncio.Event(), asyncio.Event()
    got: dict[str, list[str]] = {}

    async def hold_first() -> None:
        async with first.claim(BATCHER, T0 + 100, limit) as claim:
            got["first"] = [window.id for window in claim.windows]
            first_in.set()
            await second_done.wait()

    async def claim_second() -> None:
        await first_in.wait()
        got["second"] = await asyncio.wait_for(claim_all(second, T0 + 100, limit), 5)
        second_done.set()

    async with asyncio.TaskGroup() as group:
        group.create_task(hold_first())
        group.create_task(claim_second())
    return got["first"], got["second"]


async def test_two_claims_at_once_never_share_a_window(store: SqlWindowStore) -> None:
    await closed_windows(store, 10)

    first, second = await hold_together(store, store, limit=6)

    assert (len(first), len(second)) == (6, 4)
    assert set(first).isdisjoint(second)
    assert len(await claim_all(store)) == 10  # both released, nothing applied


async def test_many_claims_at_once_split_the_windows(store: SqlWindowStore) -> None:
    await closed_windows(store, 30)
    gate = asyncio.Event()

    async def flush() -> list[str]:
        async with store.claim(BATCHER, T0 + 100, 4) as claim:
            await gate.wait()  # all claims are open together
            for window in claim.windows:
                claim.done(window)
            return [window.id for window in claim.windows]

    tasks = [asyncio.create_task(flush()) for _ in range(8)]
    await asyncio.sleep(0.5)
    gate.set()
    claimed = [window_id for task in tasks for window_id in await task]

    assert len(claimed) == len(set(claimed)) == 30
    assert await store.open_windows(BATCHER) == OpenWindows()


async def test_stores_on_separate_engines_skip_each_others_windows_on_postgresql(
    make_store: MakeStore,
) -> None:
    one, other = await make_store(), await make_store()
    if not is_postgresql(one):
        pytest.skip("row locks between processes: PostgreSQL (SQLite: the flush lock)")
    await closed_windows(one, 5)

    first, second = await hold_together(one, other, limit=3)

    assert (len(first), len(second)) == (3, 2)
    assert set(first).isdisjoint(second)
    assert len(await claim_all(other)) == 5  # released when the first claim ended


async def test_on_postgresql_a_claimer_cut_off_gives_its_windows_to_the_others(
    make_store: MakeStore, database_url: str
) -> None:
    proxy, through_proxy = await postgres_through_a_proxy(database_url)
    cut_off, other = await make_store(through_proxy), await make_store()
    await closed_windows(other, 3)
    held: list[str] = []

    async def others_get_them() -> bool:
        return sorted(await claim_all(other)) == sorted(held)

    async def flush_and_get_cut_off() -> None:
        async with cut_off.claim(BATCHER, T0 + 100, 10) as claim:
            held.extend(window.id for window in claim.windows)
            assert await claim_all(other) == []
            await proxy.cut()  # as if the process died: the server ends its transaction
            await eventually(others_get_them)
            claim.done(claim.windows[0])  # cannot be applied any more

    try:
        with pytest.raises(DBAPIError):
            await flush_and_get_cut_off()
    finally:
        await proxy.cut()
    assert len(held) == 3
    assert len(await claim_all(other)) == 3


async def test_on_postgresql_a_connection_the_server_dropped_is_replaced(
    make_store: MakeStore, database_url: str
) -> None:
    proxy, through_proxy = await postgres_through_a_proxy(database_url)
    try:
        store = await make_store(through_proxy)
        await store.append(BATCHER, messages("k", range(75)), RULE, T0)
        await proxy.cut()  # the pooled connections are dead now
        await proxy.resume()

        assert await store.close_due(BATCHER, RULE, T0, limit=10) == 1
        assert (await store.open_windows(BATCHER)).closed == 1
    finally:
        await proxy.cut()


def only_on_sqlite(database_url: str) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("the flush lock: SQLite (PostgreSQL: row locks)")


async def test_on_sqlite_a_second_process_flushes_nothing_until_the_first_stops(
    make_store: MakeStore, database_url: str
) -> None:
    only_on_sqlite(database_url)
    first, second = await make_store(), await make_store()
    await closed_windows(first, 3)

    assert len(await claim_all(first)) == 3
    assert await claim_all(second) == []
    # The second process appends and closes all the same.
    await second.append(BATCHER, messages("other", [99]), RULE, T0)
    assert await second.close_due(BATCHER, RULE, T0 + 60, limit=10) == 1
    assert len(await claim_all(first)) == 4

    await first.close()
    assert len(await claim_all(second)) == 4


async def test_on_sqlite_the_flush_passes_to_another_process_when_its_holder_dies(
    make_store: MakeStore, database_url: str, tmp_path: Path
) -> None:
    only_on_sqlite(database_url)
    locks = tmp_path / "locks"
    locks.mkdir()
    store = await make_store(database_url, lock_dir=locks)
    await closed_windows(store, 2)
    lock_file = locks / f"{Path(str(make_url(database_url).database)).name}.windows.lock"
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(60)",
        str(lock_file),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"held\n"
        assert await claim_all(store) == []
    finally:
        holder.kill()
        await holder.wait()

    assert len(await claim_all(store)) == 2


async def test_an_in_memory_sqlite_store_needs_no_lock_file(tmp_path: Path) -> None:
    store = SqlWindowStore("sqlite+aiosqlite:///:memory:", lock_dir=tmp_path)
    await store.start()
    try:
        # Appends, closes, claims and completions at once on its one connection.
        rule = WindowRule(size=5, timeout=10.0)
        flushed: list[StoredWindow] = []

        async def append(key: str) -> None:
            for n in range(0, 50, 5):
                await store.append(BATCHER, messages(key, range(n, n + 5), key), rule, T0)

        async def flush() -> None:
            for _ in range(20):
                await store.close_due(BATCHER, rule, T0, limit=5)
                flushed.extend(await flush_all(store))

        await asyncio.gather(append("a"), append("b"), flush(), flush())
        await store.close_due(BATCHER, rule, T0, limit=100)
        flushed.extend(await flush_all(store))
    finally:
        await store.close()
    members = [message_id for window in flushed for message_id in ids_of(window)]
    assert sorted(members, key=str) == sorted(
        [f"{key}{n}" for key in "ab" for n in range(50)], key=str
    )
    assert await asyncio.to_thread(os.listdir, tmp_path) == []


async def test_replicas_closing_at_once_put_each_message_in_exactly_one_window(
    make_store: MakeStore,
) -> None:
    replicas = [await make_store(), await make_store()]
    rule = WindowRule(size=25, timeout=0.2)
    keys = [f"key{n:03d}" for n in range(300)]
    appended: list[str] = []
    appending = True

    async def append(owned: list[str], hot: str, replica: SqlWindowStore) -> None:
        """20 chunks of 40 messages over this appender's keys and 10 for its hot key
        (which fills windows); no other appender has these keys, so that a key's ids,
        numbered in order, sort as its messages were appended."""
        numbers = itertools.count()
        for _ in range(20):
            chunk = []
            for slot in range(50):
                n = next(numbers)
                key = owned[n % len(owned)] if slot < 40 else hot
                chunk.append(StoredMessage(key, "{}", "{}", f"{key}/{n:05d}"))
            await replica.append(BATCHER, chunk, rule, time.time())
            appended.extend(str(m.message_id) for m in chunk)

    async def close(replica: SqlWindowStore) -> None:
        while appending:
            await replica.close_due(BATCHER, rule, time.time(), limit=20)

    closers = [asyncio.create_task(close(replica)) for replica in replicas for _ in range(2)]
    try:
        await asyncio.gather(*(append(keys[n::3], f"hot{n}", replicas[n % 2]) for n in range(3)))
    finally:
        appending = False
        await asyncio.gather(*closers)
    while await replicas[0].close_due(BATCHER, rule, time.time() + 3600, limit=100):
        pass

    assert (await replicas[1].open_windows(BATCHER)).messages == 0
    windows = await flush_all(replicas[0], now=time.time() + 3600)
    members = Counter(message_id for window in windows for message_id in ids_of(window))
    assert len(appended) == 3000
    assert members == Counter(appended)  # each message exactly once
    assert Counter(window.trigger for window in windows).keys() == {"size", "timeout"}
    for window in windows:  # of one key, in the order appended, as many as the trigger says
        assert {str(i).split("/")[0] for i in ids_of(window)} == {window.batch_key}
        assert ids_of(window) == sorted(ids_of(window), key=str)
        assert window.trigger == rule.trigger(len(window.messages))
        assert 0 < len(window.messages) <= rule.size


async def test_open_windows_tells_what_the_store_holds(store: SqlWindowStore) -> None:
    rule = WindowRule(size=10, timeout=60.0)
    await store.append(BATCHER, messages("a", range(5)), rule, T0 + 1)
    await store.append(BATCHER, messages("b", range(5, 8)), rule, T0)
    await store.append(BATCHER, messages("c", range(8, 20)), rule, T0 + 2)
    await store.append(BATCHER, messages("d", range(20, 21)), rule, T0 + 3)
    await store.append("other", messages("z", range(50)), rule, T0 - 100)
    await store.close_due(BATCHER, rule, T0 + 3, limit=10)  # c, by size

    figures = await store.open_windows(BATCHER, busiest=3)

    assert figures == OpenWindows(
        windows=4,
        messages=5 + 3 + 2 + 1,
        oldest_opened_at=T0,
        closed=1,
        busiest=(("a", 5), ("b", 3), ("c", 2)),
    )
    assert await store.open_windows("nobody") == OpenWindows()


async def test_stores_starting_at_once_create_the_schema_once(
    database_url: str,
) -> None:
    stores = [SqlWindowStore(database_url) for _ in range(4)]
    try:
        await asyncio.gather(*(store.start() for store in stores))
        await stores[0].append(BATCHER, messages("k", [1]), RULE, T0)
        assert (await stores[3].open_windows(BATCHER)).messages == 1
    finally:
        for store in stores:
            await store.close()


async def test_a_store_given_an_engine_works_at_its_isolation_level_and_leaves_it_open(
    database_url: str,
) -> None:
    # Not autocommit: the engine's own default (a transaction per connection).
    engine = create_async_engine(database_url)
    try:
        store = SqlWindowStore(engine)
        await store.start()
        await store.append(BATCHER, messages("k", range(75)), RULE, T0)
        assert await store.close_due(BATCHER, RULE, T0, limit=10) == 1
        assert [len(window.messages) for window in await flush_all(store)] == [75]
        await store.close()

        async with engine.connect() as connection:  # still usable: not disposed
            left = await connection.exec_driver_sql("SELECT count(*) FROM ingest_window_windows")
            assert left.scalar_one() == 0
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "url", ["mysql+aiomysql://db/x", "postgresql+psycopg://db/x", "sqlite:///x.db"]
)
def test_a_database_or_driver_the_sql_is_not_written_for_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"postgresql\+asyncpg://\.\.\. or sqlite\+aiosqlite"):
        SqlWindowStore(url)
