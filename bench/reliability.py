"""Rerun the reliability suite with larger counts and write docs/RELIABILITY.md.

    python bench/reliability.py [--scale 10] [--only EXPRESSION]

With --only, just the matching tests (a pytest -k expression) run again and their rows
replace the ones of the same scenario in docs/reliability-results.json, from which the
table is rendered.

Every scenario multiplies its CI message count by --scale (the poison test its number of
examples of 500 payloads) and appends its figures to a report; the table is rendered from
that report, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (
    ("scenario", "scenario"),
    ("messages", "messages"),
    ("faults", "faults injected"),
    ("lost", "lost"),
    ("duplicate_tickets", "duplicate tickets"),
    ("duplicate_emails", "repeated emails"),
    ("recovery_s", "recovery (s)"),
    ("peak_rss_mb", "peak RSS (MB)"),
)


def merge(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per scenario: a property-based test records one per example."""
    merged: dict[str, dict[str, Any]] = {}
    examples: dict[str, int] = {}
    for row in rows:
        name = row["scenario"]
        examples[name] = examples.get(name, 0) + 1
        if name not in merged:
            merged[name] = dict(row)
            continue
        total = merged[name]
        for key in ("messages", "lost", "duplicate_tickets", "duplicate_emails"):
            total[key] += row[key]
        total["recovery_s"] = round(total["recovery_s"] + row["recovery_s"], 1)
        total["peak_rss_mb"] = max(total["peak_rss_mb"], row["peak_rss_mb"])
    for name, count in examples.items():
        if count > 1:
            merged[name]["faults"] = f"{merged[name]['faults']} ({count} examples)"
    return list(merged.values())


def render(
    rows: list[dict[str, Any]], scale: float, seconds: float, status: int, only: str | None
) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    cpu = platform.processor() or platform.machine()
    last = f" (`--only {only}`; the other rows come from earlier runs)" if only else ""
    return f"""# Reliability

Produced by `python bench/reliability.py --scale {scale:g}` on {datetime.now(UTC):%Y-%m-%d}
({os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, RabbitMQ and the
service on the same machine; SQLite). The suite itself is `pytest -m reliability`
(`tests/reliability`), which CI runs at scale 1. The last run{last} took {seconds:.0f} s and
pytest exited with {status}.

Each scenario runs the real service (`python -m ingest run`) as a subprocess against the
real broker, a real SMTP server (aiosmtpd) and its database, publishes bookings with unique
`message_id`s, injects its faults, then checks the ledger: every message_id has exactly
one ticket and its notification was sent, the work, retry and dead-letter queues and the
unacked counts end at zero (checked after a clean stop, which returns anything
unacknowledged to its queue, once the work and retry queues have stayed empty for longer
than the longest retry delay), and nothing was acknowledged before it was processed (it
would be lost).

- *lost*: bookings without a ticket at the end — must be 0.
- *duplicate tickets*: tickets beyond one per message_id — must be 0 (the insert is
  idempotent on `message_id`).
- *repeated emails*: notifications that appeared in more than one digest. Not a loss: after
  a crash between sending a digest and recording it, the notification is sent again
  (at-least-once email); everywhere else the record of sent ids removes repeats.
- *recovery*: from the end of the last fault (or the restart) until every ticket and
  notification was there; for the poison and backlog rows, the whole run.
- *peak RSS*: the service process's VmHWM.

{header}
{rule}
{chr(10).join(body)}

How to rerun: start RabbitMQ with its management plugin, install the project with its
`dev` extra, then `python bench/reliability.py --scale 10` (about ten times the CI
counts; the backlog row is then 200,000 messages).
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=10)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "RELIABILITY.md")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "reliability-results.json")
    parser.add_argument("--only", metavar="EXPRESSION", help="rerun only these tests (pytest -k)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        report = Path(directory) / "report.jsonl"
        env = {
            **os.environ,
            "INGEST_RELIABILITY_SCALE": str(args.scale),
            "INGEST_RELIABILITY_REPORT": str(report),
        }
        started = datetime.now(UTC)
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-m",
                "reliability",
                "-p",
                "no:cacheprovider",
                "-q",
                *(["-k", args.only] if args.only else []),
                str(ROOT / "tests" / "reliability"),
            ],
            env=env,
            cwd=ROOT,
            check=False,
        ).returncode
        seconds = (datetime.now(UTC) - started).total_seconds()
        lines = report.read_text().splitlines() if report.exists() else []
    rows = [json.loads(line) for line in lines]
    if args.only and args.results.exists():
        renewed = {row["scenario"] for row in rows}
        previous = json.loads(args.results.read_text())
        rows = [row for row in previous if row["scenario"] not in renewed] + rows
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(rows, indent=1) + "\n")
    args.output.write_text(render(merge(rows), args.scale, seconds, status, args.only))
    print(f"{len(rows)} scenarios written to {args.output}; pytest exited with {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
