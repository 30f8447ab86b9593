"""What the devcluster tells its user: progress on stderr, the cluster's addresses on stdout (so a
test reads stdout alone and finds `endpoint ...` as its last line), and errors that say what to do."""

from __future__ import annotations

import sys


class DevclusterError(Exception):
    """A step failed; `hint` says what the user can do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        message = super().__str__()
        return f"{message}\n{self.hint}" if self.hint else message


def say(message: str) -> None:
    print(f"devcluster: {message}", file=sys.stderr, flush=True)


def announce(line: str) -> None:
    """A line of the cluster's description (`s3 ...`, `replica ...`, `endpoint ...`), for people and
    programs alike."""
    print(line, flush=True)
