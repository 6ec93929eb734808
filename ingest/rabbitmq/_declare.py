"""Declaring a consumer's queues on a channel: the work queue, its dead-letter queue, its
retry queues, and the bindings."""

from __future__ import annotations

import aiormq

from ingest.rabbitmq.acknowledger import retry_queue_name
from ingest.rabbitmq.options import RabbitMQOptions


async def declare(channel: aiormq.abc.AbstractChannel, options: RabbitMQOptions) -> None:
    """Declare what the options ask for: the queue, its dead-letter queue, its retry
    queues (each dead-lettering back into the queue after its delay), and bindings."""
    queue = options.declare
    if queue is not None:
        await channel.queue_declare(
            options.queue,
            durable=queue.durable,
            auto_delete=queue.auto_delete,
            exclusive=queue.exclusive,
            passive=queue.passive,
            arguments=dict(queue.arguments),
        )
    if options.dlq_name:
        await channel.queue_declare(options.dlq_name, durable=True)
    if options.retry is not None:
        for delay in sorted(set(options.retry.delays)):
            await channel.queue_declare(
                retry_queue_name(options.queue, delay),
                durable=True,
                arguments={
                    "x-message-ttl": round(delay * 1000),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": options.queue,
                },
            )
    for binding in options.bindings:
        await channel.queue_bind(
            options.queue,
            binding.exchange,
            routing_key=binding.routing_key,
            arguments=dict(binding.arguments),
        )
