"""`ingest dlq show|replay|purge PIPELINE`: a pipeline's dead letters from the command
line (and the rows the HTTP endpoints answer with)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ingest.exceptions import ConfigurationError
from ingest.rabbitmq.dead_letters import DeadLetter, DeadLetters
from ingest.service import tracing
from ingest.service.progress import ProgressBar
from ingest.service.settings import Settings
from ingest.text import escaped

PREVIEW = 40


def dead_letters(settings: Settings, name: str, queues: Sequence[str]) -> DeadLetters:
    """The dead letters of `queues` (a pipeline's queue, or its partitions)."""
    if not queues:
        raise ConfigurationError(f"pipeline {name} has no queue, so no dead letters")
    return DeadLetters(
        settings.amqp_url.get_secret_value(),
        queues,
        name="ingest-dlq",
        tracer=tracing.publish_tracer(),
    )


def row(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as JSON: what the table shows, the payload previewed."""
    return {
        "reason": letter.reason,
        "attempts": letter.attempts,
        "failed_at": letter.failed_at.isoformat() if letter.failed_at else None,
        "message_id": letter.message_id,
        "queue": letter.queue,
        "payload": preview(letter.body),
    }


def preview(body: bytes) -> str:
    """The payload's start, on one line (its control characters escaped)."""
    return _cut(body.decode("utf-8", "backslashreplace"), PREVIEW)


def table(letters: list[DeadLetter]) -> str:
    header = ("reason", "attempts", "dead-lettered (UTC)", "message_id", "payload")
    rows = [
        (
            _cut(letter.reason, 50),
            str(letter.attempts),
            letter.failed_at.strftime("%Y-%m-%d %H:%M:%S") if letter.failed_at else "-",
            _cut(letter.message_id or "-", 36),
            preview(letter.body),
        )
        for letter in letters
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True))
        for r in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


async def show(dead: DeadLetters, limit: int, reason: str | None) -> int:
    async with dead:
        total = await dead.count()
        letters = await dead.show(limit, reason)
    if letters:
        print(table(letters))
    matching = f" matching {reason!r}" if reason else ""
    print(f"{len(letters)} shown{matching}, {total} in {dead.dead_letter_queue} (left there)")
    return 0


async def replay(dead: DeadLetters, limit: int | None, reason: str | None) -> int:
    async with dead:
        total = await dead.count()
        bar = ProgressBar(min(total, limit) if limit else total)
        result = await dead.replay(limit, reason, bar.advance)
    bar.done()
    print(
        f"replayed {result.replayed} to {dead.queue} (confirmed), "
        f"{result.skipped} left in {dead.dead_letter_queue} (another reason)"
    )
    return 0


async def purge(dead: DeadLetters, yes: bool) -> int:
    if not yes:
        raise ConfigurationError(f"purging deletes every dead letter of {dead.queue}: add --yes")
    async with dead:
        purged = await dead.purge()
    print(f"purged {purged} dead letter(s) from {dead.dead_letter_queue}")
    return 0


def _cut(text: str, width: int) -> str:
    """`text` escaped (what a terminal would obey: ESC, CR, LF) and cut to `width`."""
    text = escaped(text)
    return text if len(text) <= width else text[: width - 1] + "…"
