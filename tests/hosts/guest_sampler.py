"""Where install.sh spends its time, measured from outside: install.sh runs untouched (as a user
runs it) while a thread looks at the process table twice a second and charges each sample to the
phase its processes show (dpkg at work, apt downloading, pip, ...)."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

INTERVAL = 0.5


def _command_lines() -> list[str]:
    lines = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                raw = handle.read()
        except OSError:
            continue
        if raw:
            lines.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return lines


def classify(lines: list[str]) -> str:
    """The phase a snapshot of command lines shows, most specific first."""

    def running(word: str) -> bool:
        return any(word in line for line in lines)

    if running("dpkg") and not running("dpkg-query"):
        return "dpkg (unpack, configure, triggers)"
    if running("apt-get update"):
        return "apt-get update"
    if running("apt-get install"):
        return "apt-get install: download + resolve" if running("/apt/methods/") else "apt-get install: other"
    if running("-m venv") or running("ensurepip"):
        return "python3 -m venv"
    if running("pip install"):
        return "pip install: compiling" if running("cc1") or running("gcc") else "pip install"
    if running("runsc_install"):
        return "runsc_install (trixie runsc)"
    if running("dpkg-query"):
        return "dpkg-query (checks)"
    return "other"


class Sampler:
    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(INTERVAL):
            now = time.monotonic()
            self.seconds[classify(_command_lines())] += now - last
            last = now

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        return ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in self.seconds.most_common())
