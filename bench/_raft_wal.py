"""RabbitMQ's Raft write-ahead log, as a benchmark must account for it.

Every quorum queue of a node appends to one WAL file. When it passes
`raft.wal_max_size_bytes` (512 MB by default) the node starts a new file, writes what its
live queues still hold in the old one to their segment files, and reads those entries from
the segments from then on. A bookings run (fill and drain) writes 88 MB, so about one run
in six has its drain overlap a roll-over that the runs before it caused, and RabbitMQ's CPU
in that drain goes up by 20 to 30 % (docs/PERFORMANCE.md, issue 23, sixth session).

The service benchmark rolls the WAL over before each fill: every run starts from an empty
log, never fills one, and keeps its backlog in memory as a run on a quiet node does.
(Rolled over between the fill and the drain instead, every drain would read its backlog
from the segments.) It also says how many roll-overs happened during the drain.

Both need `rabbitmqctl` on this machine, talking to the broker the benchmark uses; without
it they do nothing and say so (False, None).
"""

from __future__ import annotations

import shutil
import subprocess

# The WAL of the node's quorum-queue Raft system, and its segment writer (ra 2.x names).
_ROLL_OVER = (
    "ok = ra_log_wal:force_roll_over(ra_log_wal),"
    " ra_log_segment_writer:await(ra_log_segment_writer)."
)
# The number of the WAL file in use: each new file's is one more.
_LAST_WAL = (
    'lists:max([0 | [list_to_integer(filename:basename(F, ".wal")) || F <-'
    ' filelib:wildcard("*.wal", maps:get(wal_data_dir, ra_system:fetch(quorum_queues)))]]).'
)


def _evaluate(expression: str) -> str | None:
    if shutil.which("rabbitmqctl") is None:
        return None
    done = subprocess.run(
        ["rabbitmqctl", "-q", "eval", expression],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def roll_over() -> bool:
    """Start a new WAL file and wait until the segment writer has written out the old
    one: True when done, False when `rabbitmqctl` is missing or refused."""
    return _evaluate(_ROLL_OVER) == "ok"


def last_file() -> int | None:
    """The number of the node's current WAL file (None: not known here)."""
    answer = _evaluate(_LAST_WAL)
    return int(answer) if answer is not None and answer.isdigit() else None
