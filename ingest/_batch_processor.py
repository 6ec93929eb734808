"""The batch processor stage: handle_batch on closed batches, then acknowledgement."""

from __future__ import annotations

import asyncio

from ingest._buffer import Buffer
from ingest._runtime import Batch, Runtime, describe_return, reraise_own_cancellation
from ingest._span import Span
from ingest.batch_info import BatchInfo
from ingest.message import OK, Failed, Message, fail_with_exception


async def run_batch_processor(rt: Runtime, name: str, inbox: Buffer[Batch]) -> None:
    """Process one batch at a time until the batcher closes the inbox."""
    while True:
        batches = await inbox.take(1)
        if not batches:
            return
        await process_batch(rt, name, batches[0])


async def process_batch(rt: Runtime, name: str, batch: Batch) -> None:
    messages = batch.messages
    info = BatchInfo(batch.batcher, batch.batch_key, batch.partition, len(messages), batch.trigger)
    span = batch_span(rt, name, messages, info).start()
    successful, failed = await call_handle_batch(rt, span, messages, info)
    await rt.settle(name, "batch_processor", successful, failed)
    span.stop(successful=len(successful), failed=len(failed))


def batch_span(rt: Runtime, name: str, messages: list[Message], info: BatchInfo) -> Span:
    """The span of one `handle_batch` call (`batch.*` events), by batch processor `name`."""
    return Span(rt.events, "batch", rt.pipeline, name, "batch_processor", messages, info)


async def call_handle_batch(
    rt: Runtime, span: Span, messages: list[Message], info: BatchInfo
) -> tuple[list[Message], list[Message]]:
    """`handle_batch` on a batch (`span` started: its `batch.exception` if it raised);
    the batch's successful and failed messages (all failed if it raised)."""
    try:
        # A copy: a hook that filters the list in place cannot make messages vanish.
        returned = await rt.handlers.handle_batch(info.batcher, list(messages), info, rt.context)
        if not isinstance(returned, list):
            raise TypeError(
                f"handle_batch must return a list, returned {describe_return(returned)}"
            )
    except (Exception, asyncio.CancelledError) as exc:
        reraise_own_cancellation(exc)
        for message in messages:
            fail_with_exception(message, exc, "handle_batch")
        span.exception(exc)
        return [], messages
    return _split(returned, messages)


def _split(returned: list[Message], batch: list[Message]) -> tuple[list[Message], list[Message]]:
    """Successful and failed messages of a batch; the ones handle_batch did not return are
    failed rather than leaked (Broadway would never acknowledge them). Only the batch's own
    messages count: one returned in place of another does not hide the other."""
    successful: list[Message] = []
    failed: list[Message] = []
    missing = {id(message) for message in batch}
    for message in returned:
        if id(message) in missing:  # the batch's own, and the first time it comes back
            missing.discard(id(message))
            (successful if message.status is OK else failed).append(message)
    for message in batch:
        if id(message) in missing:
            message.status = Failed("missing from the list handle_batch returned")
            failed.append(message)
    return successful, failed
