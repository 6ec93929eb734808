"""Acknowledgement frames packed by hand: many per write, none built through pamqp.

A basic.ack / basic.reject / basic.nack method frame is 21 bytes: frame type 1, channel,
payload size 13, class 60, method id, the delivery tag and one byte of flags, then 0xCE.
"""

from __future__ import annotations

import struct

_METHOD = struct.Struct(">BHIHHQBB")
_ACK, _REJECT, _NACK = 80, 90, 120
_FRAME_END = 0xCE


def ack(channel: int, delivery_tag: int, *, multiple: bool = False) -> bytes:
    return _METHOD.pack(1, channel, 13, 60, _ACK, delivery_tag, multiple, _FRAME_END)


def reject(channel: int, delivery_tag: int, *, requeue: bool) -> bytes:
    return _METHOD.pack(1, channel, 13, 60, _REJECT, delivery_tag, requeue, _FRAME_END)


def nack(channel: int, delivery_tag: int, *, multiple: bool, requeue: bool) -> bytes:
    flags = int(multiple) | int(requeue) << 1
    return _METHOD.pack(1, channel, 13, 60, _NACK, delivery_tag, flags, _FRAME_END)
