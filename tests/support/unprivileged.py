"""Running a command as a user other than root (`nobody`), as a local user of a server run as a
system service would, and directories such a user can reach.

The tests run as root; pytest's own temp dirs (/tmp/pytest-of-root, 0700) are closed to other
users, so what `nobody` must reach lives in a directory of /tmp that anyone may traverse (0711)
but not list.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import REPO

USER = "nobody"


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to run commands as another user (the test suite runs as root)")
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv is not on PATH: Debian's util-linux package has it")


def ids() -> tuple[int, int]:
    entry = pwd.getpwnam(USER)
    return entry.pw_uid, entry.pw_gid


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A login-like environment for `nobody`: none of root's home, AWS or openmicrovm settings."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": pwd.getpwnam(USER).pw_dir,
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        # Python writes no bytecode caches into the checkout as another user.
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.update(extra or {})
    return env


def run(
    argv: list[str], env: dict[str, str], timeout: float = 120, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """`argv` as `nobody` (no supplementary groups, no capabilities)."""
    uid, gid = ids()
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def reachable_dir(prefix: str = "openmicrovm-nonroot-") -> Iterator[Path]:
    """A fresh directory in /tmp that other users may traverse but not list; removed afterwards
    with whatever any user left in it."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        path.chmod(0o711)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
