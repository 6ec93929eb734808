"""Partitions: key-affine consumption on RabbitMQ 3.10+ — an `x-consistent-hash` exchange
hashing a header onto P quorum queues with single active consumer, shared by R replicas
of a service, each the first consumer (the owner) of its share and a standby of the rest::

    partitions = Partitions("notifications_queue", count=16, header="recipient")
    options = partitions.consumer_options(base, Replica(index=0, count=3), declare_of)
"""

from __future__ import annotations

import functools
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiormq

from ingest.rabbitmq.options import AfterConnect, Binding, QueueDeclare, RabbitMQOptions
from ingest.rabbitmq.publisher import OutgoingMessage

# Each partition's share of the hash ring: equal weights, equal shares.
WEIGHT = "1"
STANDBY_DELAY_S = 5.0


@dataclass(frozen=True, slots=True)
class Replica:
    """Which of `count` alike processes this is (`index` from 0)::

    Replica(index=1, count=3)
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"replica index must be in 0..{self.count - 1} for {self.count} replicas, "
                f"got {self.index}"
            )

    @classmethod
    def of(cls, index: int | None, count: int | None, hostname: str | None = None) -> Replica:
        """From settings (INGEST_REPLICA_INDEX, INGEST_REPLICAS); with a count but no index,
        from a StatefulSet-style host name ending in `-<ordinal>` (`ingest-2`)."""
        if count is None:
            if index is not None:
                raise ValueError("INGEST_REPLICA_INDEX needs INGEST_REPLICAS (how many there are)")
            return cls()
        if index is None:
            name = hostname if hostname is not None else socket.gethostname()
            ordinal = re.search(r"-(\d+)$", name)
            if ordinal is None:
                raise ValueError(
                    f"INGEST_REPLICAS={count} needs INGEST_REPLICA_INDEX, or a host name "
                    f"ending in -<ordinal> (a StatefulSet's pods); this one is {name!r}"
                )
            index = int(ordinal.group(1))
        return cls(index, count)


@dataclass(frozen=True, slots=True)
class Partitions:
    """`count` partition queues `<queue>.p00`, `<queue>.p01`, ... behind the exchange
    `<queue>.hash`, which routes a message by the hash of its `header`: the same key, the
    same partition. Each partition queue has single active consumer, its own retry queues
    and dead-letter queue (`<queue>.p00.dlq`)."""

    queue: str
    count: int = 16
    header: str = "recipient"

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 1000:
            raise ValueError(f"partitions must be between 1 and 1000, got {self.count}")

    @property
    def exchange(self) -> str:
        return f"{self.queue}.hash"

    def queue_of(self, partition: int) -> str:
        return f"{self.queue}.p{partition:02d}"

    @property
    def queues(self) -> list[str]:
        return [self.queue_of(p) for p in range(self.count)]

    def owned(self, replica: Replica) -> list[int]:
        """The partitions `replica` consumes first: p with p mod R = i."""
        return [p for p in range(self.count) if p % replica.count == replica.index]

    def declare_of(self, declare: QueueDeclare) -> QueueDeclare:
        """A partition queue's declaration: `declare` (quorum, its dead-letter queue)
        with single active consumer."""
        return replace(declare, arguments={**declare.arguments, "x-single-active-consumer": True})

    async def declare_exchange(self, channel: aiormq.abc.AbstractChannel) -> None:
        await channel.exchange_declare(
            self.exchange,
            exchange_type="x-consistent-hash",
            durable=True,
            arguments={"hash-header": self.header},
        )

    async def declare(
        self,
        channel: aiormq.abc.AbstractChannel,
        declare_of: Callable[[str], QueueDeclare],
    ) -> None:
        """The exchange, every partition queue and its binding: what a publisher needs
        before the consumers have started."""
        await self.declare_exchange(channel)
        for queue in self.queues:
            how = self.declare_of(declare_of(queue))
            await channel.queue_declare(queue, durable=how.durable, arguments=dict(how.arguments))
            await channel.queue_bind(queue, self.exchange, routing_key=WEIGHT)

    def publisher_hook(self, declare_of: Callable[[str], QueueDeclare]) -> AfterConnect:
        """`Publisher(after_connect=...)`: declare what publishing needs."""
        return functools.partial(self.declare, declare_of=declare_of)

    def message(self, body: bytes, key: str, **properties: Any) -> OutgoingMessage:
        """A message routed by `key` (the header's value) through the exchange."""
        given: Mapping[str, Any] = properties.pop("headers", None) or {}
        headers = {**given, self.header: key}
        return OutgoingMessage(body, "", self.exchange, headers=headers, **properties)

    def consumer_options(
        self,
        base: RabbitMQOptions,
        replica: Replica,
        declare_of: Callable[[str], QueueDeclare],
        standby_delay: float = STANDBY_DELAY_S,
    ) -> RabbitMQOptions:
        """`base` made into one consumer per partition (each its own connection), those
        `replica` owns consuming at once and the others `standby_delay` seconds later, so
        that the owners' consumers are the active ones while their replicas live."""
        owned = set(self.owned(replica))
        per_partition = {
            p: {
                "queue": self.queue_of(p),
                "declare": self.declare_of(declare_of(self.queue_of(p))),
                "bindings": (Binding(self.exchange, routing_key=WEIGHT),),
                "consume_delay": 0.0 if p in owned else standby_delay,
            }
            for p in range(self.count)
        }
        return replace(
            base,
            queue=self.queue_of(0),
            concurrency=self.count,
            per_producer=per_partition,
            after_connect=self.declare_exchange,
        )
