"""The processes of a devcluster (PostgreSQL, S3, replicas, agents).

Each runs in a session of its own with its output in a log file: a SIGKILLed `up` then leaves them
running for `down` to stop (a pipe to the dead `up` would kill them with SIGPIPE, or block them
once full), and a Ctrl-C at the terminal reaches `up` alone, which stops them in order. A process
is known by its pid and its start time, so that `down` never signals a process that merely got a
recycled pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openmicrovm.devcluster.progress import DevclusterError, say

PROGRESS_EVERY_SECONDS = 5.0
_POLL_SECONDS = 0.05
# Begins the line a log gets before each start of its process.
COMMAND_LINE_MARK = "--- devcluster: "
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")


def redact(text: str) -> str:
    """The text with the passwords of URLs in it (postgresql://user:password@...) starred out."""
    return _URL_PASSWORD.sub(r"\1***@", text)


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    # Clock ticks after boot at which the process started (field 22 of /proc/PID/stat).
    start_time: int

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> ProcessIdentity | None:
        if not isinstance(record.get("pid"), int) or not isinstance(record.get("start_time"), int):
            return None
        return cls(record["pid"], record["start_time"])


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def identify(pid: int) -> ProcessIdentity | None:
    fields = _stat_fields(pid)
    return None if fields is None else ProcessIdentity(pid, int(fields[19]))


def is_running(identity: ProcessIdentity) -> bool:
    """Whether this very process still runs. A zombie counts as ended: in a container, nobody may
    reap the orphans of a killed `up` for a long while."""
    fields = _stat_fields(identity.pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == identity.start_time


def group_members(leader: ProcessIdentity) -> list[ProcessIdentity]:
    """The live processes of the leader's process group (its session, as every process here starts
    one), the leader included while it lives. Those that started before the leader cannot be of its
    group: they hold a recycled group id."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if (
            fields is not None
            and fields[0] != "Z"
            and int(fields[2]) == leader.pid
            and int(fields[19]) >= leader.start_time
        ):
            members.append(ProcessIdentity(int(entry.name), int(fields[19])))
    return members


def signal_process(identity: ProcessIdentity, signum: int) -> None:
    if is_running(identity):
        with contextlib.suppress(ProcessLookupError):
            os.kill(identity.pid, signum)


def kill_group(leader: ProcessIdentity) -> None:
    for member in group_members(leader):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member.pid, signal.SIGKILL)


@dataclass
class ManagedProcess:
    """A process of the cluster: one this `up` started (popen set, so that it is reaped), or one
    found in cluster.json by `down`."""

    name: str
    identity: ProcessIdentity
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return is_running(self.identity)

    def exit_description(self) -> str:
        if self.popen is None or self.popen.returncode is None:
            return "ended"
        code = self.popen.returncode
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def to_json(self) -> dict[str, Any]:
        return {**self.identity.to_json(), "log": str(self.log_path)}


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def start(
    name: str,
    command: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
    user: str | None = None,
) -> ManagedProcess:
    """Start `command` in a session of its own, its output appended to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # One line, whatever the arguments hold, so that it never passes for the process's own output.
        command_line = redact(shlex.join(command)).replace("\n", "\\n")
        log.write(f"{COMMAND_LINE_MARK}{command_line}\n".encode())
        log.flush()
        try:
            popen = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                user=user,
                group=user,
                extra_groups=[] if user is not None else None,
            )
        except OSError as error:
            raise DevclusterError(f"cannot start {name} ({command[0]}): {error}") from error
    identity = identify(popen.pid) or ProcessIdentity(popen.pid, 0)
    return ManagedProcess(name, identity, log_path, popen)


async def wait_until(
    process: ManagedProcess,
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    hint: str,
) -> None:
    """Wait until ready() holds, saying every few seconds that we still wait; fail with the log's
    tail when the process ends first or the timeout passes."""
    started = time.monotonic()
    next_progress = started + PROGRESS_EVERY_SECONDS
    while not ready():
        if not process.running():
            raise DevclusterError(
                f"{process.name} {process.exit_description()} before {what}; the end of {process.log_path}:\n"
                f"{process.log_tail()}",
                hint,
            )
        now = time.monotonic()
        if now - started > timeout:
            raise DevclusterError(
                f"{process.name} did not get {what} within {timeout:.0f} s; the end of {process.log_path}:\n"
                f"{process.log_tail()}",
                hint,
            )
        if now >= next_progress:
            last_line = process.log_tail(1).strip()
            if last_line.startswith(COMMAND_LINE_MARK) or not last_line:
                last_line = "(no output yet)"
            say(f"still waiting for {process.name} ({now - started:.0f} s): {redact(last_line)[:160]}")
            next_progress = now + PROGRESS_EVERY_SECONDS
        await asyncio.sleep(_POLL_SECONDS * 2)


class LogWatcher:
    """Finds a line in a growing log file, reading each byte once."""

    def __init__(self, path: Path, matches: Callable[[str], bool]) -> None:
        self.path = path
        self.matches = matches
        # Lines already in the file are from an earlier run of the same role (a log appended to).
        self._offset = path.stat().st_size if path.exists() else 0
        self._partial = b""
        self.found: str | None = None

    def __call__(self) -> bool:
        if self.found is not None:
            return True
        try:
            with open(self.path, "rb") as log:
                log.seek(self._offset)
                chunk = log.read()
        except FileNotFoundError:
            return False
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            if self.matches(line):
                self.found = line
                return True
        return False


async def wait_ended(identity_or_process: ManagedProcess | ProcessIdentity, timeout: float) -> bool:
    """Whether the process ended within timeout."""
    running = (
        identity_or_process.running
        if isinstance(identity_or_process, ManagedProcess)
        else lambda: is_running(identity_or_process)
    )
    deadline = time.monotonic() + timeout
    while running():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(_POLL_SECONDS)
    return True


async def stop(process: ManagedProcess, *, signum: int = signal.SIGTERM, grace: float = 20.0) -> None:
    """Ask the process to stop with signum; after `grace` seconds, or if it leaves children behind,
    SIGKILL its whole process group."""
    if process.running():
        signal_process(process.identity, signum)
        if not await wait_ended(process, grace):
            say(
                f"{process.name} did not stop within {grace:.0f} s of {signal.Signals(signum).name}: killing it"
            )
    await kill_group_and_wait(process.identity)
    await wait_ended(process, 10.0)


async def kill_group_and_wait(leader: ProcessIdentity, timeout: float = 10.0) -> None:
    """SIGKILL the group, and return once its members are gone (a signal is delivered, and a
    process ends, some time after kill() returns)."""
    kill_group(leader)
    deadline = time.monotonic() + timeout
    while group_members(leader) and time.monotonic() < deadline:
        await asyncio.sleep(_POLL_SECONDS)


async def run_to_end(
    name: str, command: Sequence[str], *, log_path: Path, env: Mapping[str, str], timeout: float
) -> int | None:
    """Run a short command to its end; its exit status, or None if it had to be killed."""
    process = start(name, command, log_path=log_path, env=env)
    if await wait_ended(process, timeout):
        return process.popen.returncode if process.popen is not None else None
    await kill_group_and_wait(process.identity)
    await wait_ended(process, 10.0)
    return None
