"""Every aiormq internal the fast path uses, in one table: where it is, what kind, which
module of the fast path uses it, and what for.

Written against aiormq 7.2 (see `gate`). Names are looked up when checked, never at import,
so that one gone is a refusal (plain aiormq instead) rather than an import error.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

# Names aiormq mangles (`self.__reader` in `Connection`, `self.__get_content_header` in
# `Channel`), and the channel's handler `deliver_directly` shadows, spelled once.
CONNECTION_READER = "_Connection__reader"
CONTENT_HEADER_READER = "_Channel__get_content_header"
ON_DELIVER_FRAME = "_on_deliver_frame"


@dataclass(frozen=True, slots=True)
class Internal:
    """One aiormq internal. `kind` says how it is checked: "method" (callable) or
    "property", on the class, by the version gate (`gate.usable`); a type, an attribute
    every instance has (aiormq sets it in `__init__`), checked on each object before the
    fast path takes it over (`gate.fits`); None, read where it is used, which says what
    happens without it."""

    owner: str  # its class, under `aiormq`
    name: str
    kind: Literal["method", "property"] | type | None
    used_by: tuple[str, ...]  # modules of this package
    why: str


INTERNALS = (
    Internal(
        "Connection",
        CONNECTION_READER,
        "method",
        ("reader",),
        "the one method aiormq hands the connection's FrameReceiver to: `install` shadows it "
        "on one connection, to give that receiver `reader.get_frame`",
    ),
    Internal(
        "connection.FrameReceiver",
        "get_frame",
        "method",
        ("reader",),
        "aiormq's frame reader: `reader.get_frame` is its drop-in, on installed connections only",
    ),
    Internal(
        "Channel",
        CONTENT_HEADER_READER,
        "method",
        ("delivery",),
        "reads a delivery's content header from the channel's frame queue",
    ),
    Internal(
        "Channel",
        "_read_content",
        "method",
        ("delivery",),
        "reads a delivery's body frames and builds its DeliveredMessage",
    ),
    Internal(
        "Channel",
        ON_DELIVER_FRAME,
        "method",
        ("delivery", "reader"),
        "the channel's basic.deliver handler: `deliver_directly` shadows it on one channel, "
        "and the reader marks an undecodable header only for a channel where it is shadowed",
    ),
    Internal(
        "Channel",
        "_on_confirm_frame",
        "method",
        ("publishing",),
        "settles `confirmations` by delivery tag on the broker's basic.ack / basic.nack",
    ),
    Internal(
        "Channel",
        "_confirm_delivery",
        "method",
        ("publishing",),
        "what `_on_confirm_frame` calls for each tag it settles (a multiple ack, several)",
    ),
    Internal(
        "Channel",
        "_on_return_frame",
        "method",
        ("publishing",),
        "finds a returned message's delivery tag by its message id and settles it",
    ),
    Internal(
        "Channel",
        "create_future",
        "method",
        ("publishing",),
        "a future in the channel's future store, rejected when the channel closes (a batch's)",
    ),
    Internal(
        "Channel",
        "lock",
        "property",
        ("publishing",),
        "the lock `basic_publish` holds while it numbers and queues a publish",
    ),
    Internal(
        "Channel",
        "consumers",
        dict,
        ("delivery",),
        "the consumer tags the channel knows: a delivery for another is dropped, as aiormq does",
    ),
    Internal(
        "Channel",
        "write_queue",
        asyncio.Queue,
        ("delivery", "publishing"),
        "the connection's writer's queue: frames packed by hand go in as one write",
    ),
    Internal(
        "Channel",
        "delivery_tag",
        int,
        ("publishing",),
        "the last publish sequence number, shared with aiormq's own `basic_publish`",
    ),
    Internal(
        "Channel",
        "confirmations",
        OrderedDict,
        ("publishing",),
        "what `_on_confirm_frame` and `_on_return_frame` settle by delivery tag (a close "
        "rejects pending ones through the channel's future store, not through this table)",
    ),
    Internal(
        "Channel",
        "message_id_delivery_tag",
        dict,
        ("publishing",),
        "each publish's delivery tag by message id, by which `_on_return_frame` finds it",
    ),
    Internal(
        "Channel",
        "max_content_size",
        int,
        ("publishing",),
        "the largest body frame payload the connection takes (frame_max less the overhead)",
    ),
    Internal(
        "Channel",
        "publisher_confirms",
        None,
        ("publishing",),
        "the option the channel was opened with: without confirms, the public path",
    ),
    Internal(
        "Channel",
        "on_return_raises",
        None,
        ("publishing",),
        "the option the channel was opened with: without it a return settles as a result, "
        "which the public path reads as aiormq does",
    ),
    Internal(
        "connection.FrameReceiver",
        "reader",
        None,
        ("reader",),
        "the stream the receiver reads: a receiver without it (or `started`) keeps aiormq's "
        "own reader, and the refusal is logged",
    ),
    Internal(
        "connection.FrameReceiver",
        "started",
        None,
        ("reader",),
        "whether a frame came yet: an AMQP protocol header first is the broker refusing ours",
    ),
    Internal(
        "Connection",
        "channels",
        None,
        ("reader",),
        "the connection's channels by number, looked up with a default: without it no "
        "channel counts as delivering directly",
    ),
)

# What the version gate checks on the classes.
ON_CLASSES = tuple(internal for internal in INTERNALS if isinstance(internal.kind, str))


def channel_attributes(user: str) -> tuple[tuple[str, type], ...]:
    """The attributes an open channel must have, with their types, for `user`'s part of
    the fast path to take it over."""
    return tuple(
        (internal.name, internal.kind)
        for internal in INTERNALS
        if internal.owner == "Channel"
        and isinstance(internal.kind, type)
        and user in internal.used_by
    )


DELIVERY_CHANNEL = channel_attributes("delivery")
PUBLISHING_CHANNEL = channel_attributes("publishing")
