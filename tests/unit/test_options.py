"""Options are validated when a pipeline is built, with errors that say what to change."""

from __future__ import annotations

import math
from typing import Any

import pytest

from ingest import Batcher, Handlers, InMemoryProducer, Message, Pipeline, Processors, RateLimiting


class Minimal(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message


@pytest.mark.parametrize(
    ("build", "error"),
    [
        pytest.param(
            lambda: Processors(concurrency=0),
            "processors: concurrency must be an int >= 1, got 0",
            id="zero-processors",
        ),
        pytest.param(
            lambda: Processors(max_demand=5, min_demand=5),
            r"min_demand \(5\) must be smaller than max_demand \(5\)",
            id="min-demand-too-big",
        ),
        pytest.param(
            lambda: Batcher(batch_size=0),
            "batcher: batch_size must be an int >= 1, got 0",
            id="zero-batch-size",
        ),
        pytest.param(
            lambda: Batcher(batch_timeout=-1),
            "batcher: batch_timeout must be a number of seconds > 0",
            id="negative-timeout",
        ),
        pytest.param(
            lambda: Batcher(concurrency=True),
            "batcher: concurrency must be an int >= 1, got True",
            id="bool-concurrency",
        ),
        pytest.param(
            lambda: RateLimiting(allowed_messages=0),
            "rate_limiting: allowed_messages must be an int >= 1",
            id="zero-rate",
        ),
        pytest.param(
            lambda: RateLimiting(allowed_messages=1, interval=float("inf")),
            "rate_limiting: interval must be a number of seconds > 0",
            id="infinite-interval",
        ),
    ],
)
def test_invalid_option_values_are_refused(build: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        build()


def test_batchers_without_handle_batch_are_refused() -> None:
    with pytest.raises(
        TypeError, match="declares batchers \\(cinema\\) but does not define handle_batch"
    ):
        Pipeline("p", Minimal(), InMemoryProducer(), batchers={"cinema": Batcher()})


def test_handlers_without_handle_message_are_refused() -> None:
    with pytest.raises(TypeError, match=r"Handlers must define handle_message"):
        Pipeline("p", Handlers(), InMemoryProducer())


def test_a_producer_must_implement_the_producer_protocol() -> None:
    with pytest.raises(TypeError, match=r"producer must implement ingest\.Producer"):
        Pipeline("p", Minimal(), object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "seconds",
    [0, -1, "5", True, math.nan, math.inf],
    ids=["zero", "negative", "string", "bool", "nan", "inf"],
)
@pytest.mark.parametrize("option", ["shutdown_timeout", "handler_timeout"])
def test_timeouts_must_be_positive_numbers(option: str, seconds: Any) -> None:
    with pytest.raises(ValueError, match=f"{option} must be a number of seconds > 0"):
        Pipeline("p", Minimal(), InMemoryProducer(), **{option: seconds})


def test_batcher_names_must_be_non_empty_strings() -> None:
    class WithBatch(Minimal):
        async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
            return messages

    with pytest.raises(ValueError, match="batcher names must be non-empty strings"):
        Pipeline("p", WithBatch(), InMemoryProducer(), batchers={"": Batcher()})


def test_put_batch_mode_refuses_unknown_modes() -> None:
    message = Message("x", InMemoryProducer())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_mode must be 'bulk' or 'flush'"):
        message.put_batch_mode("later")  # type: ignore[arg-type]
