"""Queues: how a consumer declares its own (the work queue, its dead-letter queue, its
retry queues, the bindings), a quorum work queue's arguments, and what to do when the
broker refuses a declaration::

    RabbitMQOptions(queue="orders_queue", declare=quorum("orders_queue.dlq", 20))
"""

from __future__ import annotations

import re
from typing import Any

import aiormq

from ingest.rabbitmq.acknowledger import retry_queue_name
from ingest.rabbitmq.options import QueueDeclare, RabbitMQOptions


def quorum(dead_letter_queue: str | None, delivery_limit: int | None) -> QueueDeclare:
    """A durable quorum queue: replicated across a cluster's nodes, and the broker itself
    dead-letters a message delivered more than `delivery_limit` times (one that kills its
    consumer, which a classic queue redelivers forever) into `dead_letter_queue`, with
    `x-death` saying `delivery_limit`."""
    arguments: dict[str, Any] = {"x-queue-type": "quorum"}
    if delivery_limit is not None:
        arguments["x-delivery-limit"] = delivery_limit
    if dead_letter_queue:
        arguments["x-dead-letter-exchange"] = ""
        arguments["x-dead-letter-routing-key"] = dead_letter_queue
    return QueueDeclare(durable=True, arguments=arguments)


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
    # The dead-letter and retry queues are of the work queue's type: a quorum queue's are
    # replicated too, so that a cluster node stopped leaves none of them unreachable (a
    # classic queue whose node is down cannot be declared, and its consumer would not
    # start). Quorum queues take a message TTL from RabbitMQ 3.10.
    quorum = queue is not None and queue.queue_type == "quorum"
    typed: dict[str, Any] = {"x-queue-type": "quorum"} if quorum else {}
    if options.dlq_name:
        await channel.queue_declare(options.dlq_name, durable=True, arguments=typed)
    if options.retry is not None:
        for delay in sorted(set(options.retry.delays)):
            await channel.queue_declare(
                retry_queue_name(options.queue, delay),
                durable=True,
                arguments={
                    **typed,
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


def explain_refusal(error: BaseException, options: RabbitMQOptions) -> str | None:
    """One line on what to do when the broker refused to declare a queue as asked, for
    the case people meet: the queue exists with another type or other arguments."""
    text = str(error)
    if "PRECONDITION_FAILED" not in text or "inequivalent arg" not in text:
        return None
    wanted = options.declare.queue_type if options.declare is not None else "classic"
    named = _REFUSED_QUEUE.search(text)
    refused = named.group(1) if named else options.queue
    if refused != options.queue:
        # A retry or dead-letter queue made by an earlier version as a classic queue.
        return (
            f"queue {refused!r} exists with other arguments than this service declares: "
            f"the retry and dead-letter queues of a {wanted} work queue are {wanted} "
            f"queues. A queue cannot change type in place: once it is empty "
            f"(rabbitmqctl list_queues), delete it (rabbitmqctl delete_queue {refused}) "
            f"so that it is declared anew"
        )
    return (
        f"queue {options.queue!r} exists with other arguments than this service declares "
        f"({wanted}): a queue cannot change type in place. Keep it with queue_type = "
        f"the type it has (INGEST_PIPELINES__<NAME>__QUEUE_TYPE), or move its messages "
        f"away (e.g. the shovel plugin) and delete it (rabbitmqctl delete_queue "
        f"{options.queue}) so that it is declared anew"
    )


# How the broker names the queue in a refusal: "... for queue 'orders_queue' in vhost ...".
_REFUSED_QUEUE = re.compile(r"for queue '([^']+)'")
