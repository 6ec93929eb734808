"""BatchInfo: what `handle_batch` is told about the batch it receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

BatchTrigger = Literal["size", "timeout", "flush"]


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """Which batcher and batch key a batch belongs to and why it was closed.

    `partition` is set when the pipeline has `partition_by`; `trigger` is `"size"` when
    the batch filled, `"timeout"` when `batch_timeout` passed since its first message and
    `"flush"` when a message in flush mode or the pipeline's shutdown closed it. `window`
    is the id of a durable window (`ingest.windows`): the same on every attempt of it, so
    an effect derived from it (an email's Message-ID) repeats rather than multiplies.
    """

    batcher: str
    batch_key: Any
    partition: int | None
    size: int
    trigger: BatchTrigger
    window: str | None = None
