"""Running host commands without blocking the event loop, with errors that say what failed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .driver import DriverError


def prefer_pidfd_child_watcher() -> None:
    """Call before the event loop starts. Python 3.11's asyncio waits for every child process in
    a thread of its own, which the event loop starts and waits to see running: with hundreds of
    sandboxes coming and going, those thread starts were a fifth of the loop's time. A pidfd
    (Linux 5.3) lets the loop itself hear of the exit. Python 3.12 does this by itself."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # a kernel without pidfds, or a seccomp filter that refuses them
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        output = self.stderr.strip() or self.stdout.strip()
        if len(output) > 2000:
            # The first lines usually say what failed (Go panics put a stack trace after them).
            output = output[:1500] + " [...] " + output[-500:]
        return f"`{shlex.join(self.argv)}` exited with status {self.returncode}: {output or '(no output)'}"


async def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    stdout_path: Path | None = None,
) -> Completed:
    """Run argv to completion. stdout_path sends stdout and stderr to a file (append) instead of
    capturing them: needed for commands whose children keep the descriptors open (runsc --detach)."""
    args = [str(a) for a in argv]
    out_file = None
    try:
        if stdout_path is not None:
            out_file = open(stdout_path, "ab")  # closed in finally
            stdout: int | object = out_file
            stderr: int | object = out_file
        else:
            stdout = asyncio.subprocess.PIPE
            stderr = asyncio.subprocess.PIPE
        try:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,  # type: ignore[arg-type]
                stderr=stderr,  # type: ignore[arg-type]
                env=dict(env) if env is not None else None,
                # Sandboxes must outlive a server that is stopped with Ctrl-C: keep our children out
                # of the terminal's process group.
                start_new_session=True,
            )
        except FileNotFoundError as error:
            raise DriverError(f"cannot run {args[0]}: {error.strerror}") from None
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise DriverError(f"`{shlex.join(args)}` did not finish within {timeout:g} s") from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
    finally:
        if out_file is not None:
            out_file.close()
    result = Completed(
        args,
        process.returncode if process.returncode is not None else -1,
        (out or b"").decode(errors="replace"),
        (err or b"").decode(errors="replace"),
    )
    if check and result.returncode != 0:
        raise DriverError(result.describe())
    return result


def tail(path: Path, max_bytes: int = 2000) -> str:
    """The last bytes of a log file, for error messages."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            return handle.read().decode(errors="replace").strip()
    except OSError:
        return ""
