"""ProducerStats: what a RabbitMQ producer counted, as typed fields."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar


@dataclass(slots=True)
class ProducerStats:
    """Counters of one `RabbitMQProducer`, shared by its consumers and acknowledgers::

        producer.stats.dead_letter          # 3
        producer.stats.acknowledgements()   # {"ack": 120, "reject": 0, ...}

    The acknowledgement actions (`/metrics`: `ingest_acks_total{action}`) and the other
    events (`ingest_producer_events_total{event}`) are told apart here, once, so that a
    reader never sorts counters by name.
    """

    ACTIONS: ClassVar[tuple[str, ...]] = (
        "ack",
        "reject",
        "reject_and_requeue",
        "retry",
        "release",
        "dead_letter",
    )

    # Acknowledgement actions sent to the broker.
    ack: int = 0
    reject: int = 0
    reject_and_requeue: int = 0
    retry: int = 0
    # Handed back without an attempt (the circuit breaker: raised while open or probing).
    release: int = 0
    dead_letter: int = 0
    # Connection life cycle.
    connection_losses: int = 0
    reconnects: int = 0
    # Acks for a channel that had closed (the broker redelivers those messages).
    dropped_stale: int = 0
    # Deliveries from a channel already replaced.
    dropped_stale_delivery: int = 0
    # Deliveries that arrived after the drain began, left to the broker.
    not_taken_while_draining: int = 0
    # Ack frames sent: one covering every tag up to its own, or one for a single message
    # (a message done long before older ones, or when half the prefetch waits).
    multiple_ack_frames: int = 0
    single_ack_frames: int = 0
    # Failed messages dead-lettered because their properties could not be copied as they
    # were (e.g. a header holding a long string that is not UTF-8).
    uncopyable_headers: int = 0
    # With no_ack: times consuming stopped (basic.cancel) because the intake was full.
    consume_pauses: int = 0

    def acknowledgements(self) -> dict[str, int]:
        """The acknowledgement actions, by name."""
        return {name: getattr(self, name) for name in self.ACTIONS}

    def events(self) -> dict[str, int]:
        """Every other counter, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.ACTIONS}
