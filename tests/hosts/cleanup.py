"""Leaving nothing behind: temporary trees (with whatever an interrupted debootstrap or chroot
left mounted in them) and child processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any


def _mounts_under(root: Path) -> list[Path]:
    found: list[Path] = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            # Field 5 is the mount point, with spaces and the like escaped as octal.
            point = Path(line.split()[4].encode().decode("unicode_escape"))
            if point == root or root in point.parents:
                found.append(point)
    return found


def remove_tree(root: Path) -> None:
    """rm -rf that first unmounts what is mounted below root: debootstrap mounts /proc and /sys
    into the tree it builds, and deleting through such a mount would reach the host's files."""
    if not root.exists():
        return
    for point in sorted(_mounts_under(root), key=lambda path: len(path.parts), reverse=True):
        subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)
    if _mounts_under(root):
        raise RuntimeError(f"{root} still has mounts below it; not deleting it")
    shutil.rmtree(root, ignore_errors=True)


def kill_group(process: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """End a child started with start_new_session=True, and everything it started."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
