"""Named, timed steps inside the guest, reported to the host through the results share.

Runs on the guest's own python3 (Debian 12's 3.11, standard library only): the project's venv is
what the steps install, so it cannot be what runs them.

Each step appends a "start" and an "end" event to results/steps.jsonl (the host relays them as they
come) and writes what it ran and saw to results/steps/NN-name.log. A step whose prerequisite failed
is reported failed with the reason, never silently skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO


class StepFailed(Exception):
    pass


class Log:
    """What one step ran and saw."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = open(path, "a", buffering=1)

    def write(self, text: str) -> None:
        self.handle.write(text if text.endswith("\n") else text + "\n")

    def section(self, title: str, text: str) -> None:
        self.write(f"--- {title} ---\n{text.rstrip()}\n---")


def _log_lines(stream: IO[str], log: Log, started: float, kept: list[str]) -> None:
    """Copy a command's stream into the step's log as it comes, each line stamped with the seconds
    since the command started: the log of a step still running shows where it is, and a long one
    (a deploy, install.sh) shows where its time went."""
    for line in stream:
        kept.append(line)
        log.write(f"[{time.monotonic() - started:7.1f}] {line.rstrip()}")


def run(
    log: Log,
    argv: Sequence[str] | str,
    *,
    user: str | None = None,
    timeout: float = 300.0,
    check: bool = True,
    stdin: str | None = None,
    cwd: str | None = "/opt/openmicrovm",
    stdout_to_log: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a command (a string goes to sh -c), log it with its output, raise StepFailed on a non-zero
    exit when check. user: run it as that user, with that user's HOME and nothing of root's.

    stderr (the CLI's progress and build logs) goes to the step's log as it comes; stdout is
    returned and logged at the end, unless stdout_to_log (then it is logged like stderr)."""
    command = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
    environment = dict(os.environ)
    if user is not None:
        environment = {
            "HOME": f"/home/{user}",
            "USER": user,
            "LOGNAME": user,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
        }
        command = ["/usr/sbin/runuser", "-u", user, "--", *command]
    shown = argv if isinstance(argv, str) else " ".join(argv)
    log.write(f"$ {shown}" + (f"   (as {user})" if user else ""))
    started = time.monotonic()
    # A session of its own, so that a timeout ends the command and everything it started.
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if stdout_to_log else subprocess.PIPE,
        text=True,
        errors="replace",
        cwd=cwd,
        env=environment,
        start_new_session=True,
    )
    logged: list[str] = []
    collected: list[str] = []
    assert process.stdout is not None
    if stdout_to_log:
        readers = [
            threading.Thread(target=_log_lines, args=(process.stdout, log, started, logged), daemon=True)
        ]
    else:
        readers = [threading.Thread(target=lambda: collected.append(process.stdout.read()), daemon=True)]  # type: ignore[union-attr]
    if process.stderr is not None:
        readers.append(
            threading.Thread(target=_log_lines, args=(process.stderr, log, started, logged), daemon=True)
        )
    for reader in readers:
        reader.start()
    if process.stdin is not None:
        with contextlib.suppress(BrokenPipeError):
            process.stdin.write(stdin or "")
            process.stdin.close()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.write(f"[timed out after {timeout:.0f} s]")
        raise StepFailed(f"`{shown}` did not finish within {timeout:.0f} s") from None
    finally:
        for reader in readers:
            reader.join(10)
    stdout = "".join(collected)
    stderr = "".join(logged)
    if stdout.strip():
        log.write(stdout)
    log.write(f"[exit {process.returncode} after {time.monotonic() - started:.1f} s]")
    if check and process.returncode != 0:
        tail = "\n".join((stderr + stdout).splitlines()[-15:])
        raise StepFailed(f"`{shown}` exited {process.returncode}: {tail}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def wait_for(what: str, probe: Callable[[], object], timeout: float, interval: float = 1.0) -> object:
    """probe() until it returns something truthy; its last exception is in the failure."""
    deadline = time.monotonic() + timeout
    last: str = "never true"
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception as error:  # the probe's failure only matters if it never succeeds
            last = f"{type(error).__name__}: {error}"
        if time.monotonic() > deadline:
            raise StepFailed(f"{what}: not within {timeout:.0f} s ({last})")
        time.sleep(interval)


class Steps:
    def __init__(self, results: Path) -> None:
        self.results = results
        self.logs = results / "steps"
        self.logs.mkdir(exist_ok=True)
        self.events = open(results / "steps.jsonl", "a", buffering=1)
        self.outcome: dict[str, bool] = {}
        self.count = 0

    def _emit(self, event: dict[str, object]) -> None:
        self.events.write(json.dumps(event) + "\n")
        self.events.flush()
        os.fsync(self.events.fileno())

    def run(
        self,
        name: str,
        action: Callable[[Log], str | None],
        needs: Sequence[str] = (),
        on_failure: Callable[[Log, str], None] | None = None,
    ) -> bool:
        self.count += 1
        log = Log(self.logs / f"{self.count:02d}-{name.replace(' ', '-').replace('/', '-')}.log")
        self._emit({"event": "start", "name": name})
        print(f"== {name}", flush=True)
        started = time.monotonic()
        missing = [need for need in needs if not self.outcome.get(need, False)]
        detail = ""
        if missing:
            ok = False
            detail = f"not run: needs {', '.join(missing)}, which failed"
        else:
            try:
                detail = action(log) or ""
                ok = True
            except StepFailed as error:
                ok, detail = False, str(error)
            except Exception as error:
                ok, detail = False, f"{type(error).__name__}: {error}"
                log.write(traceback.format_exc())
            if not ok and on_failure is not None:
                try:
                    on_failure(log, detail)
                except Exception as error:
                    log.write(f"collecting evidence failed too: {error}")
        seconds = round(time.monotonic() - started, 1)
        log.write(f"[{'ok' if ok else 'FAILED'} after {seconds} s] {detail}")
        log.handle.close()
        self.outcome[name] = ok
        print(f"== {name}: {'ok' if ok else 'FAILED'} {seconds} s {detail}", flush=True)
        self._emit({"event": "end", "name": name, "ok": ok, "seconds": seconds, "detail": _short(detail)})
        return ok

    def record(self, name: str, ok: bool, seconds: float, detail: str = "") -> None:
        """A step measured before this runner existed (the checkout's copy, done by entry.sh)."""
        self.count += 1
        self.outcome[name] = ok
        self._emit({"event": "end", "name": name, "ok": ok, "seconds": round(seconds, 1), "detail": detail})

    def failed(self) -> int:
        return sum(1 for ok in self.outcome.values() if not ok)


def _short(detail: str, limit: int = 600) -> str:
    flat = " | ".join(line for line in detail.splitlines() if line.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
