"""Text from input, made safe to keep: bounded in length, and escaped for a log line.

A failure reason can quote what arrived (a 65,000-character field), and whatever the
service keeps of it is shown again and again: in every snapshot of the live view, in each
log line, in a dead letter's headers. `bounded` cuts such a text once, where it enters
what is kept, and says how much was left out::

    >>> bounded("x" * 65_000, limit=40)
    'xxxxxxxxxxxxxx… (64,986 more characters)'
"""

from __future__ import annotations

from typing import Final

TEXT_LIMIT: Final = 500
"""The most characters the service keeps of a text from input (a reason, an id, a key)."""

# The shortest limit that leaves room for the marker and a few characters of the text.
_SHORTEST_LIMIT: Final = 40

# Control characters (C0, DEL, C1: ESC starts a terminal's escape sequences, CR and LF
# forge log lines, NUL cuts them short) and the line and paragraph separators some
# viewers break lines at, each written as its Python escape.
_CONTROLS: Final = {
    code: ascii(chr(code))[1:-1] for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}


def bounded(text: str, limit: int = TEXT_LIMIT) -> str:
    """`text` if it has at most `limit` characters, else its start followed by "…" and how
    many characters were left out, `limit` characters in all."""
    if len(text) <= limit:
        return text
    if limit < _SHORTEST_LIMIT:
        raise ValueError(f"limit must be at least {_SHORTEST_LIMIT} characters, not {limit}")
    left_out = len(text) - limit
    while True:  # the marker grows with the count it gives: at most a digit or two more
        marker = f"… ({left_out:,} more characters)"
        kept = limit - len(marker)
        if len(text) - kept == left_out:
            return text[:kept] + marker
        left_out = len(text) - kept


def escaped(text: str) -> str:
    """`text` with each control character written as its Python escape (`\\x1b`, `\\r`,
    `\\n`, `\\x00`, ...), so that it prints on one line and drives no terminal."""
    return text.translate(_CONTROLS)
