"""A progress display on stderr for anything that takes more than a moment.

On a terminal it is one line, rewritten in place, with the time elapsed; log lines scroll above
it. Anywhere else (a pipe, a CI log) each new status is printed once as a plain line, so the
output reads well after the fact. Nothing is shown for work that ends within `delay` seconds.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, delay: float = 1.0) -> None:
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.delay = delay
        self.started = time.monotonic()
        self._status = ""
        self._printed_status = ""
        self._line_shown = False

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def update(self, status: str) -> None:
        """The current status; shown once the work has taken longer than `delay`."""
        self._status = status
        if self._elapsed() < self.delay:
            return
        if self.interactive:
            self._draw()
        elif status != self._printed_status:
            self._printed_status = status
            print(status, file=self.stream, flush=True)

    def log(self, line: str) -> None:
        """A line of output (a build log line, say) that stays on screen."""
        if self.interactive and self._line_shown:
            self.stream.write("\r\x1b[K")
            self._line_shown = False
        print(line, file=self.stream, flush=True)
        if self.interactive and self._status and self._elapsed() >= self.delay:
            self._draw()

    def _draw(self) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        text = f"{self._status} ({self._elapsed():.0f}s)"
        if len(text) >= width:
            text = text[: max(width - 2, 1)] + "…"
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._line_shown = True

    def finish(self, final: str | None = None) -> None:
        """Clear the status line; print `final` if the work was long enough to show progress."""
        if self.interactive and self._line_shown:
            self.stream.write("\r\x1b[K")
            self._line_shown = False
        if final and self._elapsed() >= self.delay:
            print(final, file=self.stream, flush=True)
        self.stream.flush()
