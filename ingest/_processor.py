"""The processor stage: prepare_messages and handle_message over chunks, then route."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, cast

from ingest._buffer import Buffer
from ingest._runtime import Runtime, describe_return, reraise_own_cancellation
from ingest.events import Event
from ingest.exceptions import HandlerTimeout
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
    started = time.perf_counter()
    if events:
        events.emit(Event("processor.start", rt.pipeline, name, "processor", chunk))
    done: list[Message] = []
    failed: list[Message] = []
    routed: dict[str, list[Message]] = {}
    try:
        # A copy: a hook that filters the list in place cannot make messages vanish.
        prepared = await rt.handlers.prepare_messages(list(chunk), rt.context)
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
        if events:
            events.emit(
                Event("processor.exception", rt.pipeline, name, "processor", chunk, exception=exc)
            )
    else:
        await _handle_messages(rt, prepared, done, failed, routed)

    for batcher, messages in routed.items():
        await rt.batcher_inboxes[batcher].put_many(messages)
    if done or failed:
        await rt.settle(name, "processor", done, failed)
    if events:
        events.emit(
            Event(
                "processor.stop",
                rt.pipeline,
                name,
                "processor",
                chunk,
                duration=time.perf_counter() - started,
                successful=len(chunk) - len(failed),
                failed=len(failed),
            )
        )


async def _handle_messages(
    rt: Runtime,
    messages: list[Message],
    done: list[Message],
    failed: list[Message],
    routed: dict[str, list[Message]],
) -> None:
    """Run handle_message on each message, in order, sorting them into done (no batchers),
    failed, or routed per batcher."""
    handle_message = rt.handlers.handle_message
    context = rt.context
    timeout = rt.handler_timeout
    inboxes = rt.batcher_inboxes
    events = rt.events
    started = 0.0
    for message in messages:
        if message.status is not OK:
            failed.append(message)
            continue
        # Decided once per message: a subscriber may arrive while the handler runs.
        traced = bool(events)
        if traced:
            started = time.perf_counter()
            events.emit(Event("message.start", rt.pipeline, PROCESSOR_KEY, "processor", (message,)))
        try:
            if timeout is None:
                coroutine = handle_message(PROCESSOR_KEY, message, context)
            else:
                coroutine = _with_timeout(handle_message(PROCESSOR_KEY, message, context), timeout)
            # A hook may return anything; it is checked below.
            result = cast(object, await coroutine)
        except (Exception, asyncio.CancelledError) as exc:
            reraise_own_cancellation(exc)
            fail_with_exception(message, exc, "handle_message")
            failed.append(message)
            if traced:
                events.emit(
                    Event(
                        "message.exception",
                        rt.pipeline,
                        PROCESSOR_KEY,
                        "processor",
                        (message,),
                        exception=exc,
                    )
                )
            continue
        if traced:
            events.emit(
                Event(
                    "message.stop",
                    rt.pipeline,
                    PROCESSOR_KEY,
                    "processor",
                    (message,),
                    duration=time.perf_counter() - started,
                )
            )
        if not isinstance(result, Message):
            message.status = Failed(
                f"handle_message returned {describe_return(result)}, expected a Message"
            )
            failed.append(message)
        elif result.status is not OK:
            failed.append(result)
        elif not inboxes:
            done.append(result)
        else:
            _route(result, inboxes, routed, failed)


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


async def _with_timeout(coroutine: Coroutine[Any, Any, Message], seconds: float) -> Message:
    cm = asyncio.timeout(seconds)
    try:
        async with cm:
            return await coroutine
    except TimeoutError:
        if cm.expired():
            raise HandlerTimeout(f"timed out after {seconds:g}s") from None
        raise
