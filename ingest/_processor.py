"""The processor stage: prepare_messages and handle_message over chunks, then route."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from ingest._buffer import Buffer
from ingest._deadline import Deadline
from ingest._runtime import Runtime, describe_return, reraise_own_cancellation
from ingest._span import Span
from ingest.message import OK, Failed, Message, fail_with_exception

PROCESSOR_KEY = "default"
# Processor stages are named `processor_<index>` (events and logs say which stage).
PROCESSOR_STAGE = "processor_"


async def run_processor(rt: Runtime, name: str, inbox: Buffer[Message], max_demand: int) -> None:
    """Take chunks of up to `max_demand` messages until the inbox is closed and empty."""
    limiter = rt.rate_limiter
    while True:
        if limiter is None:
            chunk = await inbox.take(max_demand)
            if not chunk:
                return
        else:
            if not await inbox.wait_items():
                return
            granted = await limiter.acquire(min(max_demand, len(inbox)))
            chunk = inbox.take_nowait(granted)
            limiter.release(granted - len(chunk))
            if not chunk:
                continue
        await process_chunk(rt, name, chunk)


async def process_chunk(rt: Runtime, name: str, chunk: list[Message]) -> None:
    events = rt.events
    span = Span(events, "processor", rt.pipeline, name, "processor", chunk).start()
    done: list[Message] = []
    failed: list[Message] = []
    routed: dict[str, list[Message]] = {}
    # handle_message's seconds per message, for the metrics (observed per chunk).
    durations: list[float] | None = [] if events else None
    try:
        prepared = await _prepare(rt, name, chunk)
        if (
            not isinstance(prepared, list)
            or len(prepared) != len(chunk)
            or not all(isinstance(message, Message) for message in prepared)
        ):
            raise TypeError(
                f"prepare_messages must return a list of the {len(chunk)} Messages it got, "
                f"returned {describe_return(prepared)}"
            )
    except (Exception, asyncio.CancelledError) as exc:
        reraise_own_cancellation(exc)
        for message in chunk:
            # A message the hook failed on purpose before raising keeps its own reason
            # (a bad payload stays a bad payload while the database is down).
            if message.is_ok:
                fail_with_exception(message, exc, "prepare_messages")
        failed = chunk
        span.exception(exc)
    else:
        await _handle_messages(rt, prepared, done, failed, routed, durations)

    for batcher, messages in routed.items():
        await rt.batcher_inboxes[batcher].put_many(messages)
    if done or failed:
        await rt.settle(name, "processor", done, failed)
    span.stop(successful=len(chunk) - len(failed), failed=len(failed), durations=durations or ())


async def _prepare(rt: Runtime, name: str, chunk: list[Message]) -> list[Message]:
    """prepare_messages on a chunk, in its `prepare` span: what it returned."""
    span = Span(rt.events, "prepare", rt.pipeline, name, "processor", chunk).start()
    try:
        # A copy: a hook that filters the list in place cannot make messages vanish.
        prepared = await rt.handlers.prepare_messages(list(chunk), rt.context)
    except (Exception, asyncio.CancelledError) as exc:
        reraise_own_cancellation(exc)
        span.exception(exc)
        raise
    span.stop()
    return prepared


async def _handle_messages(
    rt: Runtime,
    messages: list[Message],
    done: list[Message],
    failed: list[Message],
    routed: dict[str, list[Message]],
    durations: list[float] | None,
) -> None:
    """Run handle_message on each message, in order, sorting them into done (no batchers),
    failed, or routed per batcher; the seconds of each call go to `durations`, if given."""
    deadline = None if rt.handler_timeout is None else Deadline(rt.handler_timeout)
    try:
        for message in messages:
            if message.status is not OK:
                failed.append(message)
                continue
            result = await _handle_one(rt, message, deadline, durations)
            if result is None:
                failed.append(message)
            elif not isinstance(result, Message):
                message.status = Failed(
                    f"handle_message returned {describe_return(result)}, expected a Message"
                )
                failed.append(message)
            elif result.status is not OK:
                failed.append(result)
            elif not rt.batcher_inboxes:
                done.append(result)
            else:
                _route(result, rt.batcher_inboxes, routed, failed)
    finally:
        if deadline is not None:
            deadline.close()


async def _handle_one(
    rt: Runtime, message: Message, deadline: Deadline | None, durations: list[float] | None
) -> object | None:
    """One handle_message call: what it returned, or None when it raised (the message is
    then failed with the exception)."""
    # Decided once per message: a subscriber may arrive while the handler runs.
    span = _message_span(rt, message).start() if rt.events.per_message else None
    timed = span is not None or durations is not None
    started = time.perf_counter() if timed else 0.0
    if deadline is not None:
        deadline.begin()
    try:
        # A hook may return anything; the caller checks it.
        result = cast(object, await rt.handlers.handle_message(PROCESSOR_KEY, message, rt.context))
    except (Exception, asyncio.CancelledError) as raised:
        error = raised if deadline is None else deadline.end(raised)
        assert error is not None
        reraise_own_cancellation(error)
        fail_with_exception(message, error, "handle_message")
        # Emitted whoever listens: a message's failure is worth its span even untraced.
        (span or _message_span(rt, message)).exception(error)
        return None
    if deadline is not None:
        deadline.end(None)
    elapsed = time.perf_counter() - started if timed else 0.0
    if durations is not None:
        durations.append(elapsed)
    if span is not None:
        span.stop(duration=elapsed)
    return result


def _message_span(rt: Runtime, message: Message) -> Span:
    return Span(rt.events, "message", rt.pipeline, PROCESSOR_KEY, "processor", (message,))


def _route(
    message: Message,
    inboxes: dict[str, Buffer[Message]],
    routed: dict[str, list[Message]],
    failed: list[Message],
) -> None:
    batcher = message.batcher
    if batcher not in inboxes:
        message.status = Failed(
            f"unknown batcher {batcher!r}; declared batchers: {', '.join(sorted(inboxes))}"
        )
        failed.append(message)
        return
    try:
        hash(message.batch_key)
    except TypeError:
        message.status = Failed(f"batch_key {message.batch_key!r} is not hashable")
        failed.append(message)
        return
    messages = routed.get(batcher)
    if messages is None:
        routed[batcher] = [message]
    else:
        messages.append(message)
