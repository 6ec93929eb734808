"""`ingest dlq show`'s table: what a dead letter carries is shown, never obeyed by the
terminal (a reason or payload may hold ESC sequences, CR and LF from input)."""

from __future__ import annotations

from datetime import UTC, datetime

from ingest.rabbitmq.dead_letters import DeadLetter
from ingest.service.dlq import row, table


def letter(reason: str, message_id: str, body: bytes) -> DeadLetter:
    return DeadLetter(reason, 3, datetime(2026, 12, 4, tzinfo=UTC), message_id, body, "q")


def test_control_characters_are_escaped_in_every_cell() -> None:
    hostile = letter("\x1b[2J\x1b[31mred\r\nforged line", "id\x1b]0;title\x07", b"a\rb\nc\x00")
    shown = table([hostile])
    assert not any(c in shown for c in "\x1b\r\x00\x07")
    assert shown.count("\n") == 1  # the header and one row: no line forged
    assert "\\x1b[31mred\\r\\nforged" in shown
    assert row(hostile)["payload"] == "a\\rb\\nc\\x00"


def test_long_cells_are_cut() -> None:
    shown = table([letter("r" * 200, "m" * 100, b"p" * 100)])
    row_line = shown.splitlines()[1]
    assert "r" * 49 + "…" in row_line
    assert "r" * 50 not in row_line
    assert "p" * 39 + "…" in row_line
