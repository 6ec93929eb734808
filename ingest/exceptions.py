"""Every exception `ingest` raises on purpose, in one tree under `IngestError`."""

from __future__ import annotations

__all__ = [
    "BufferClosed",
    "ConfigurationError",
    "HandlerTimeout",
    "IngestError",
    "PipelineFailed",
    "ProducerNotRunning",
    "PublishError",
    "ReportDeferred",
    "StageCrashed",
    "StartupError",
    "Unroutable",
    "UploadRejected",
]


class IngestError(Exception):
    """The base class: `except IngestError` catches whatever `ingest` raises on purpose."""


# -- the engine ------------------------------------------------------------------------


class BufferClosed(IngestError):
    """Raised to a producer that pushes into a pipeline that has begun draining."""


class ProducerNotRunning(IngestError, RuntimeError):
    """`InMemoryProducer.push` before the pipeline started or after it began draining."""


class HandlerTimeout(IngestError):
    """`handle_message` ran longer than the pipeline's `handler_timeout`; the message
    fails with this exception."""


class StageCrashed(IngestError):
    """An exception escaped a stage of a pipeline (or a task of its producer): a bug, never
    a message's failure. The pipeline is restarted; its unacknowledged messages are left to
    the producer (a broker redelivers them)."""

    def __init__(self, pipeline: str, stage: str, error: BaseException) -> None:
        super().__init__(f"pipeline {pipeline!r}: stage {stage} crashed: {error!r}")
        self.pipeline = pipeline
        self.stage = stage
        self.error = error


class PipelineFailed(IngestError):
    """A pipeline crashed more often than its restart limit allows (`max_restarts` within
    `max_seconds`) and was given up; `ingest run` then stops and exits non-zero."""


# -- the RabbitMQ connector ------------------------------------------------------------


class PublishError(IngestError):
    """A publish the broker did not confirm."""


class Unroutable(PublishError):
    """The broker returned the message: no queue is bound for its routing key."""


# -- the service -----------------------------------------------------------------------


class ConfigurationError(IngestError):
    """The configuration cannot work; the message says what to change (`ingest` exits 2)."""


class StartupError(IngestError):
    """Something the pipelines need (a database, a mail server, a port) is not there
    (`ingest` exits 1)."""


class UploadRejected(IngestError):
    """An uploaded file that cannot be processed: too large (`too_large`, HTTP 413), not
    UTF-8, not CSV or empty (HTTP 422). The message says which, for the person uploading."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


class ReportDeferred(IngestError):
    """Raised by an upload's report (`FileProcessing.report`) when it may go later: the
    mail server is down, unreachable or refused it for now (SMTP 4xx). It is tried again;
    any other exception fails the upload at once."""
