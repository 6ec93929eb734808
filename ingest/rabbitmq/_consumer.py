"""Consumer: one connection, one channel, one consumer of a RabbitMQProducer, reconnected
for as long as it runs; its tasks belong to the pipeline's supervisor."""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import structlog
from aiormq.abc import ConsumerCallback, DeliveredMessage

from ingest.exceptions import BufferClosed
from ingest.message import Message
from ingest.producer import Sink
from ingest.rabbitmq._aiormq import delivery
from ingest.rabbitmq._backoff import reconnect_delay
from ingest.rabbitmq._metadata import metadata_reader
from ingest.rabbitmq.acknowledger import ChannelAcknowledger, Delivery
from ingest.rabbitmq.connection import CONNECTION_ERRORS, open_connection, redact
from ingest.rabbitmq.options import RabbitMQOptions
from ingest.rabbitmq.queues import declare, explain_refusal
from ingest.rabbitmq.stats import ProducerStats
from ingest.waiting import first_of

logger = structlog.get_logger("ingest.rabbitmq")

_errors = aiormq.exceptions
# What connecting again can get past: the broker or the network went away, a channel was
# closed under us (aiormq raises ChannelInvalidStateError, a RuntimeError, for it), or the
# broker refused what the options ask for. Anything else escapes: a bug, which fails the
# pipeline (its supervisor restarts it) instead of reconnecting forever.
RETRYABLE = (*CONNECTION_ERRORS, _errors.ChannelInvalidStateError)
# The broker refusing the configuration (a missing queue with passive declare or a missing
# exchange to bind to, different queue arguments, no permission, a wrong password): still
# retried, since an operator can fix it without a restart, but logged as an error.
REFUSALS = (
    _errors.AMQPChannelError,
    _errors.AuthenticationError,
    _errors.ProbableAuthenticationError,
    _errors.ConnectionNotAllowed,
)


def _closed_under_the_call() -> bool:
    """Whether a CancelledError out of an aiormq call is aiormq cancelling the call because
    the connection closed (close() came meanwhile), rather than this task's cancellation."""
    task = asyncio.current_task()
    return task is None or not task.cancelling()


class Consumer:
    """One connection, one channel, one consumer, reconnected for as long as it runs.

    Made afresh for each start of its producer (a pipeline restarted after a crash gets
    new consumers). Deliveries go to the sink at once when it has room; what it has no room
    for waits here, in arrival order, and one task hands it over as room appears. With
    `no_ack` the broker ignores the prefetch, so consuming stops (basic.cancel) while
    messages wait and starts again once they are taken.
    """

    def __init__(
        self,
        options: RabbitMQOptions,
        index: int,
        prefetch_count: int,
        stats: ProducerStats,
        sink: Sink,
        held: bool = False,
        limit: int | None = None,
    ) -> None:
        self.options = options
        self.index = index
        self.prefetch_count = prefetch_count
        self.stats = stats
        self.consuming = asyncio.Event()
        self._sink = sink
        self._read_metadata = metadata_reader(options.metadata)
        self._tasks: list[asyncio.Task[None]] = []
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._acknowledger: ChannelAcknowledger | None = None
        self._on_consume: ConsumerCallback = self._on_delivery
        self._consumer_tag: str | None = None
        self._cancelled_by_broker = asyncio.Event()
        self._draining = False
        self._arrived: list[Message] = []
        self._waiting: list[Message] = []
        self._backlog = asyncio.Event()  # set while messages wait for room, in _waiting
        self._paused = False  # no_ack: consuming stopped until the waiting ones are taken
        self._held = held  # paused by the pipeline (an operator, an open circuit)
        self._limit = limit  # a smaller prefetch while the circuit breaker probes
        self._qos = 0  # the prefetch the channel has now
        self._log = logger.bind(queue=options.queue, producer=index)

    @property
    def ready(self) -> bool:
        return self.consuming.is_set()

    def start(self) -> None:
        name = f"producer_{self.index}"
        self._tasks = [
            self._sink.spawn(self._run(), name),
            self._sink.spawn(self._hand_over_waiting(), f"{name}_hand_over"),
        ]

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect()
                attempt = 0
                await self._wait_for_loss()
            except RETRYABLE as exc:
                self._log_failure(exc, attempt + 1)
            except asyncio.CancelledError as exc:
                if not _closed_under_the_call():
                    raise
                self._log_failure(exc, attempt + 1)
            finally:
                self.consuming.clear()
            if self._draining:
                return
            await self._close_connection()
            attempt += 1
            self.stats.reconnects += 1
            delay = reconnect_delay(self.options.backoff, attempt)
            if delay is None:
                self._log.error("broker connection lost and backoff is 'stop': giving up")
                return
            await asyncio.sleep(delay)

    def _log_failure(self, error: BaseException, attempt: int) -> None:
        if explained := explain_refusal(error, self.options):
            self._log.error(explained, error=repr(error), attempt=attempt)
        elif isinstance(error, REFUSALS):
            self._log.error(
                "the broker refused what the options ask for; retrying with the backoff "
                "(fix the broker's side or the options)",
                error=repr(error),
                attempt=attempt,
            )
        else:
            self._log.warning("broker connection failed", error=repr(error), attempt=attempt)

    async def _connect(self) -> None:
        options = self.options
        url = options.connection_url()
        self._log.info("connecting", url=redact(url))
        self._connection = connection = await open_connection(
            url,
            name=options.connection_name,
            ssl_context=options.ssl_context,
            heartbeat=options.heartbeat,
        )
        # aiormq's default frame buffer (10 frames, about 3 messages) makes the channel
        # reader and the connection reader take turns every 3 messages; a buffer the size
        # of the prefetch lets a whole burst through in one turn (bounded by the prefetch).
        channel = await connection.channel(
            publisher_confirms=False, frame_buffer_size=3 * self.prefetch_count + 10
        )
        publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.basic_qos(
            prefetch_count=self.prefetch_count, prefetch_size=options.prefetch_size
        )
        self._qos = self.prefetch_count
        if options.after_connect is not None:
            await options.after_connect(channel)
        await declare(channel, options)
        self._cancelled_by_broker = asyncio.Event()
        channel.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        self._channel = channel
        self._acknowledger = ChannelAcknowledger(
            channel, publisher, options, self.stats, self.prefetch_count
        )
        # Deliveries skip aiormq's task per message: the channel's reader hands them to
        # _deliver directly (the single biggest per-message cost of a Python consumer).
        direct = delivery.deliver_directly(
            channel,
            self._deliver,
            queue=options.queue,
            no_ack=options.no_ack,
            settled_here=self._acknowledger.settled_elsewhere,
        )
        self._on_consume = delivery.ignore if direct else self._on_delivery
        self._paused = False
        if options.consume_delay:
            # A standby: the consumers registered first are the single active ones.
            await asyncio.sleep(options.consume_delay)
        if self._held or self._draining:
            self._log.info("connected; not consuming while the pipeline is paused")
            return
        await self._consume(channel)
        self.consuming.set()
        self._log.info("consuming", prefetch_count=self.prefetch_count)

    async def hold(self) -> None:
        """Stop consuming (basic.cancel) until release(), across reconnects too; what was
        delivered goes on and is acknowledged."""
        self._held = True
        self.consuming.clear()
        await self._cancel()

    async def release(self) -> None:
        self._held = False
        channel = self._channel
        if channel is None or channel.is_closed or self._draining or self._paused:
            return  # the reconnect, or the end of the no_ack pause, consumes
        if self._consumer_tag is None:
            try:
                await self._consume(channel)
            except RETRYABLE as exc:
                self._log.warning("resuming the consumer failed; reconnecting", error=repr(exc))
                await channel.close()
                return
        self.consuming.set()

    async def limit(self, prefetch: int | None) -> None:
        """Consume with a prefetch of `prefetch` (None: the consumer's own) from now on. A
        consumer consuming now consumes again with it (basic.cancel, basic.qos,
        basic.consume: a prefetch applies to the consumers made after it); what it was
        delivered goes on and is acknowledged on the same channel."""
        if prefetch == self._limit:
            return
        self._limit = prefetch
        channel = self._channel
        if self._consumer_tag is None or channel is None or channel.is_closed:
            return  # not consuming: the next basic.consume applies it
        await self._cancel()
        await self._resume()

    async def _consume(self, channel: aiormq.abc.AbstractChannel) -> None:
        options = self.options
        prefetch = self.prefetch_count if self._limit is None else self._limit
        if prefetch != self._qos:
            await channel.basic_qos(prefetch_count=prefetch, prefetch_size=options.prefetch_size)
            self._qos = prefetch
        ok = await channel.basic_consume(
            options.queue,
            self._on_consume,
            no_ack=options.no_ack,
            exclusive=options.consume_exclusive,
            arguments=dict(options.consume_arguments),
            consumer_tag=options.consumer_tag,
        )
        self._consumer_tag = ok.consumer_tag

    async def _wait_for_loss(self) -> None:
        assert self._channel is not None
        assert self._connection is not None
        # `closing` is an observer of its own (aiormq): cancelling it closes nothing.
        await first_of(
            self._channel.closing,
            self._connection.closing,
            self._cancelled_by_broker.wait(),
        )
        if self._draining:
            return
        reason = (
            "consumer cancelled by the broker"
            if self._cancelled_by_broker.is_set()
            else "connection lost"
        )
        self._log.warning("stopped consuming; reconnecting", reason=reason)
        self.stats.connection_losses += 1

    def _on_broker_cancel(self, frame: Any) -> None:
        self._cancelled_by_broker.set()

    def _deliver(self, raw: DeliveredMessage) -> None:
        acknowledger = self._acknowledger
        if acknowledger is None or acknowledger.channel is not raw.channel:
            self.stats.dropped_stale_delivery += 1
            return
        # Deliveries read in one turn of the event loop go to the pipeline together: one
        # wake-up and one chunk for the processors instead of one per message.
        if not self._arrived:
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._arrived.append(
            Message(
                raw.body, acknowledger, ack_data=Delivery(raw), metadata=self._read_metadata(raw)
            )
        )

    def _hand_over(self) -> None:
        messages, self._arrived = self._arrived, []
        if self._backlog.is_set():
            # Behind those already waiting for room: arrival order is kept.
            self._waiting.extend(messages)
            return
        try:
            if self._sink.push_nowait(messages):
                return
        except BufferClosed:
            # Draining: left unacknowledged; closing the channel hands them back to the broker.
            self.stats.not_taken_while_draining += len(messages)
            return
        self._waiting.extend(messages)
        self._backlog.set()

    async def _hand_over_waiting(self) -> None:
        """Hand the waiting messages over as room appears, at most a prefetch at a time, so
        that what the pipeline counts in flight stays bounded."""
        while True:
            await self._backlog.wait()
            while self._waiting:
                if self.options.no_ack and not self._paused:
                    await self._pause()
                chunk = self._waiting[: self.prefetch_count]
                del self._waiting[: len(chunk)]
                try:
                    await self._sink.push(chunk)
                except BufferClosed:
                    self.stats.not_taken_while_draining += len(chunk) + len(self._waiting)
                    self._waiting.clear()
            self._backlog.clear()
            if self._paused:
                await self._resume()

    async def _pause(self) -> None:
        """Stop the broker sending (no_ack ignores the prefetch) while messages wait."""
        channel, tag = self._channel, self._consumer_tag
        if channel is None or tag is None or channel.is_closed or self._draining:
            return
        self._paused = True
        self._consumer_tag = None
        self.stats.consume_pauses += 1
        try:
            await channel.basic_cancel(tag)
        except asyncio.CancelledError:
            if not _closed_under_the_call():
                raise
        except RETRYABLE as exc:
            # The channel is gone: the reconnect consumes anew.
            self._log.warning("pausing the consumer failed", error=repr(exc))

    async def _resume(self) -> None:
        self._paused = False
        channel = self._channel
        if channel is None or channel.is_closed or self._held:
            return
        if not self._draining:
            try:
                await self._consume(channel)
            except asyncio.CancelledError:
                if not _closed_under_the_call():
                    raise
                return  # the connection closed: the reconnect consumes anew
            except RETRYABLE as exc:
                # Closing the channel makes _run reconnect, and consume there.
                self._log.warning("resuming the consumer failed; reconnecting", error=repr(exc))
                if not channel.is_closed:
                    await channel.close()
                return
        if self._draining:  # drain() came while basic.consume was on its way
            await self._cancel()

    async def _on_delivery(self, raw: DeliveredMessage) -> None:
        self._deliver(raw)

    async def drain(self) -> None:
        """Stop receiving: basic.cancel, and no reconnecting from now on."""
        self._draining = True
        self.consuming.clear()
        await self._cancel()
        run = self._tasks[0] if self._tasks else None
        if run is not None and not run.done() and self._channel is None:
            run.cancel()

    async def _cancel(self) -> None:
        channel, tag = self._channel, self._consumer_tag
        self._consumer_tag = None
        if channel is not None and tag is not None and not channel.is_closed:
            try:
                await channel.basic_cancel(tag)
            except asyncio.CancelledError:
                if not _closed_under_the_call():
                    raise
                self._log.info("basic.cancel interrupted: the connection closed")
            except Exception as exc:  # a step of shutting down: said, and it goes on
                self._log.warning("basic.cancel failed", error=repr(exc))

    async def close(self) -> None:
        self._draining = True
        if self._acknowledger is not None:
            await self._acknowledger.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_connection()

    async def _close_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            try:
                await connection.close()
            except Exception as exc:
                self._log.debug("closing the connection failed", error=repr(exc))
