"""Failure logging: each failed message is one line with its pipeline, message_id and
reason, and its batcher and batch key when it failed in a batch; text from input can
neither forge a line, nor drive a terminal, nor make a line huge."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any, Literal

import pytest
import structlog
from structlog.testing import capture_logs

from ingest import Batcher, BatchInfo, Handlers, Message
from ingest.service.logging import configure_logging, log_failures
from ingest.testing import send_batch

from .conftest import MakePipeline


class FailsTwice(Handlers):
    """`bad` fails in handle_message; `late` reaches batcher `b` and fails there."""

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        if message.data == "bad":
            return message.failed("not a booking")
        return message.put_batcher("b").put_batch_key("user-1")

    async def handle_batch(
        self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
    ) -> list[Message]:
        return [m.failed("sold out") if m.data == "late" else m for m in messages]


async def test_each_failed_message_is_one_line_with_its_context(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(FailsTwice(), batchers={"b": Batcher(batch_size=2)})
    pipeline.events.subscribe(log_failures)
    with capture_logs() as logs:
        await send_batch(
            pipeline,
            ["bad", "late", "fine"],
            metadata={"message_id": "m-1"},
        )
    failures = sorted(
        (line for line in logs if line["event"] == "message failed"),
        key=lambda line: line["reason"],
    )
    assert [
        {k: v for k, v in line.items() if k not in ("log_level", "stage")} for line in failures
    ] == [
        {
            "event": "message failed",
            "pipeline": "test",
            "message_id": "m-1",
            "reason": "not a booking",
        },
        {
            "event": "message failed",
            "pipeline": "test",
            "message_id": "m-1",
            "reason": "sold out",
            "batcher": "b",
            "batch_key": "user-1",
        },
    ]


HOSTILE = "\x1b[31mred\r\nfake line\x00"
LogFormat = Literal["json", "console"]


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """`configure_logging` changes global state: put it back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    aiormq_level = logging.getLogger("aiormq").level
    yield
    structlog.reset_defaults()
    root.handlers[:], root.level = handlers, level
    logging.getLogger("aiormq").setLevel(aiormq_level)


def logged(log_format: LogFormat, capsys: pytest.CaptureFixture[str], text: str) -> list[str]:
    """The lines written for `text` as a structlog field, inside a structlog event and
    inside a standard-library logger's message (as aiormq's carry a peer's words)."""
    configure_logging(log_format, "INFO")
    structlog.get_logger("test").warning("message failed", reason=text)
    structlog.get_logger("test").warning(f"could not parse {text}")
    logging.getLogger("test").warning("stdlib says %s", text)
    output = capsys.readouterr().err
    assert output.endswith("\n")
    return output[:-1].split("\n")


@pytest.mark.parametrize("log_format", ["console", "json"])
@pytest.mark.usefixtures("logging_restored")
def test_control_characters_from_input_are_escaped_in_log_lines(
    log_format: LogFormat, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = logged(log_format, capsys, HOSTILE)
    assert len(lines) == 3  # no line forged
    for line in lines:
        assert not {"\x1b", "\r", "\x00"} & set(line)
        assert "x1b[31mred" in line  # shown, escaped (JSON and repr double the backslash)


@pytest.mark.usefixtures("logging_restored")
def test_json_log_lines_stay_json_and_carry_the_escapes_as_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """So that a viewer printing a field (`jq -r .reason`) prints it inert too."""
    field, event, stdlib = (json.loads(line) for line in logged("json", capsys, HOSTILE))
    escaped = "\\x1b[31mred\\r\\nfake line\\x00"
    assert field["reason"] == escaped
    assert event["event"] == f"could not parse {escaped}"
    assert stdlib["event"] == f"stdlib says {escaped}"


@pytest.mark.parametrize("log_format", ["console", "json"])
@pytest.mark.usefixtures("logging_restored")
def test_huge_fields_are_bounded_in_log_lines(
    log_format: LogFormat, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = logged(log_format, capsys, "x" * 65_000)
    assert len(lines) == 3
    for line in lines:
        assert "more characters)" in line
        assert len(line) < 1_000


@pytest.mark.parametrize("log_format", ["console", "json"])
@pytest.mark.usefixtures("logging_restored")
def test_texts_inside_lists_and_dicts_are_bounded_too(
    log_format: LogFormat, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the acknowledger logs what it could not copy of a message's headers."""
    configure_logging(log_format, "INFO")
    huge = "x" * 65_000
    structlog.get_logger("test").error("could not copy", problems=[huge], headers={"h": huge})
    [line] = capsys.readouterr().err.splitlines()
    assert line.count("more characters)") == 2
    assert len(line) < 1_500
