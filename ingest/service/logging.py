"""Logging: structlog configured once for the service, JSON in containers, console for
humans; the standard library's loggers (aiormq, asyncio) go through the same renderer.
Every text in a line is bounded and its control characters escaped (`safe_text`)."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import replace
from typing import Any, Literal

import structlog
from structlog.typing import EventDict, WrappedLogger

from ingest.events import Event, EventKind
from ingest.service import tracing
from ingest.text import bounded, escaped


def configure_logging(
    log_format: Literal["json", "console"] = "console", level: str = "INFO"
) -> None:
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        trace_ids,
        safe_text,  # before the tracebacks are rendered: their lines are the code's
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info
            if log_format == "json"
            else structlog.dev.set_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiormq logs every forced close as an error with a traceback; the connector logs the
    # loss once, plainly, so aiormq speaks only when debugging.
    logging.getLogger("aiormq").setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)


def trace_ids(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """A processor adding `trace_id` and `span_id` while a span is current (tracing on:
    a line logged in a hook, say, names the message's trace)."""
    traced = tracing.active()
    if traced is not None:
        traced.add_ids(event_dict)
    return event_dict


def safe_text(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """A processor making each text of a line safe to print: `bounded`, and `escaped` so
    that input (a reason quoting a payload, a peer's words in aiormq's messages) can
    neither forge a line (CR, LF), nor drive the terminal that shows it (ESC), nor make a
    line huge. Values inside lists, tuples and dicts are made safe too; JSON lines stay
    JSON, the escapes in them as text (`jq -r` prints them inert too)."""
    for key, value in event_dict.items():
        event_dict[key] = _safe(value)
    return event_dict


def _safe(value: Any) -> Any:
    if isinstance(value, str):
        return escaped(bounded(value))
    if type(value) in (list, tuple):
        return type(value)(_safe(item) for item in value)
    if type(value) is dict:
        return {_safe(key): _safe(item) for key, item in value.items()}
    return value


# The events `log_failures` reads: subscribe it to these only, so that successful
# messages cost it nothing (`pipeline.events.subscribe(log_failures, kinds=FAILURE_EVENTS)`).
FAILURE_EVENTS: frozenset[EventKind] = frozenset(("ack", "batch.exception", "processor.exception"))


def log_failures(event: Event) -> None:
    """An event handler logging each failed message with its context and reason, and
    each hook that raised; nothing for what succeeded."""
    if event.kind == "ack" and not event.failed:
        return
    log = structlog.get_logger("ingest.pipeline").bind(pipeline=event.pipeline, stage=event.stage)
    if event.kind == "ack":
        # A message failed by a processor never reached a batcher: no batcher to name.
        batched = event.stage_kind != "processor"
        for message in event.messages:
            if message.is_ok:
                continue
            where = {"batcher": message.batcher, "batch_key": message.batch_key} if batched else {}
            log.warning(
                "message failed",
                message_id=message.metadata.get("message_id"),
                reason=message.failure_reason,
                **where,
            )
    elif event.kind == "batch.exception" and event.batch_info is not None:
        log.error(
            "handle_batch raised",
            batcher=event.batch_info.batcher,
            batch_key=event.batch_info.batch_key,
            size=event.batch_info.size,
            error=repr(event.exception),
        )
    elif event.kind == "processor.exception":
        log.error("prepare_messages raised", size=len(event.messages), error=repr(event.exception))


class SampledFailures:
    """`log_failures` for a run whose failures come by the thousand (an uploaded file's
    bad rows): the first `first` failed messages one line each, then one line per `every`
    failures with how many and their commonest reasons, and `flush()` says the rest. The
    errors CSV has every row; the log says that they failed and why, in a few lines."""

    def __init__(self, first: int = 10, every: int = 1_000, reasons: int = 5) -> None:
        self.first = first
        self.every = every
        self.reasons = reasons
        self.failed = 0
        self._pending: Counter[str] = Counter()
        self._log = structlog.get_logger("ingest.pipeline")

    def __call__(self, event: Event) -> None:
        if event.kind != "ack" or not event.failed:
            log_failures(event)  # a hook that raised: always its own line
            return
        failed = [message for message in event.messages if not message.is_ok]
        shown = max(0, min(len(failed), self.first - self.failed))
        if shown:
            log_failures(replace(event, messages=tuple(failed[:shown]), failed=shown))
        for message in failed[shown:]:
            self._pending[message.failure_reason or "failed"] += 1
        self.failed += len(failed)
        if self._pending.total() >= self.every:
            self.flush(event.pipeline)

    def flush(self, pipeline: str) -> None:
        """One line for the failures not logged yet, if any."""
        if not self._pending:
            return
        self._log.warning(
            "messages failed (sampled)",
            pipeline=pipeline,
            failed=self._pending.total(),
            failed_in_all=self.failed,
            reasons=dict(self._pending.most_common(self.reasons)),
        )
        self._pending.clear()
