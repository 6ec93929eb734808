"""A progress bar on standard error, drawn only on a terminal."""

from __future__ import annotations

import sys


class ProgressBar:
    def __init__(self, total: int) -> None:
        self.total, self.count = max(total, 1), 0
        self.enabled = sys.stderr.isatty()

    def advance(self, count: int) -> None:
        self.count += count
        if self.enabled:
            filled = min(30, int(30 * self.count / self.total))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.count}/{self.total}")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
