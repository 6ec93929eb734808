"""What the fast path did that plain aiormq would not, counted for every connection of the
process, and read by name for /metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Counts:
    """What the fast path did that plain aiormq would not, for every connection of the
    process: `events.counts.undecodable_rejected`."""

    # Frames whose short strings are not UTF-8 (pamqp refuses them), decoded anyway.
    leniently_decoded: int = 0
    # Deliveries whose content header nothing could decode, rejected without requeue.
    undecodable_rejected: int = 0
    # Deliveries for a consumer tag the channel does not know, dropped as aiormq drops them.
    unknown_consumer: int = 0


counts = Counts()


def frame_events() -> dict[str, int]:
    """The fast path's counters by name, for /metrics (`ingest_frame_events_total`)."""
    return {
        "leniently_decoded": counts.leniently_decoded,
        "undecodable_rejected": counts.undecodable_rejected,
        "unknown_consumer": counts.unknown_consumer,
    }
