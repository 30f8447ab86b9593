"""Where sandbox cgroups live on a host whose cgroup v2 tree systemd manages: a scope of their own.

systemd owns /sys/fs/cgroup on such a host. Other programs may manage only cgroups below one
that systemd has delegated to them (Delegate=yes); anything else systemd may move or prune. On
cgroup v2 a cgroup whose controllers are enabled for its children may hold no processes itself
("no internal processes"). So the server's own service cgroup is the wrong home for sandboxes:
with controllers enabled there, systemd 252 cannot attach the service's next main process to it
(EBUSY) after a restart, and `systemctl restart` would kill the sandboxes too
(KillMode=control-group).

So the sandboxes of one data dir get a transient scope unit of their own, delegated to us:
`openmicrovm-<scope>.scope` in `openmicrovm.slice`, made with `systemd-run --scope`. A scope lives
while some process is inside it. The first is a keeper (`sleep infinity`). It moves into the leaf
`keeper`, so that the scope's own cgroup can enable memory, cpu and pids for the sandboxes below
it. The scope outlives the server, as the sandboxes do. It ends when the keeper is released and
the last sandbox is gone (release(): `openmicrovm cleanup`, or a server that stops with none).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .cgroups import V2_CONTROLLERS
from .driver import DriverError

log = logging.getLogger(__name__)

SLICE = "openmicrovm.slice"
KEEPER = "keeper"
SYSTEMD_RUNTIME_DIR = Path("/run/systemd/system")  # exists only while systemd is PID 1


def systemd_manages(cgroup_root: Path) -> bool:
    """True on a cgroup v2 host booted with systemd: the tree is systemd's, ours only by delegation."""
    return SYSTEMD_RUNTIME_DIR.is_dir() and (cgroup_root / "cgroup.controllers").exists()


def unit_name(scope: str) -> str:
    return f"openmicrovm-{scope}.scope"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@dataclass(frozen=True)
class DelegatedScope:
    """One data dir's scope unit; `relative` is its cgroup below the cgroup v2 root."""

    cgroup_root: Path
    unit: str

    @property
    def relative(self) -> str:
        return f"{SLICE}/{self.unit}"

    @property
    def path(self) -> Path:
        return self.cgroup_root / self.relative

    def exists(self) -> bool:
        return self.path.is_dir()

    def ensure(self, timeout: float = 15.0) -> None:
        """Make the scope if it is not there; blocking (systemd-run), so call it off the event loop."""
        if not self.exists():
            self._start(timeout)
        self._prepare()

    def describe(self) -> str:
        state = "active" if self.exists() else "made when the first sandbox starts"
        return f"systemd scope {self.unit} (Delegate=yes) at {self.path}, {state}"

    def _start(self, timeout: float) -> None:
        systemd_run = shutil.which("systemd-run")
        sleep = shutil.which("sleep")
        if systemd_run is None or sleep is None:
            raise DriverError("systemd-run is missing: it makes the systemd scope that holds the sandboxes")
        argv = [
            systemd_run,
            "--scope",
            "--quiet",
            "--collect",  # no failed unit left behind when the keeper is killed
            f"--unit={self.unit}",
            f"--slice={SLICE}",
            "--description=openmicrovm sandboxes (cgroups delegated to the openmicrovm server)",
            "--property=Delegate=yes",
            "--",
            sleep,
            "infinity",
        ]
        with tempfile.TemporaryFile() as errors:
            # Its own session: a terminal's Ctrl-C or the server's exit must not end the scope.
            keeper = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                start_new_session=True, close_fds=True,
            )  # fmt: skip
            deadline = time.monotonic() + timeout
            # systemd-run execs the keeper only once systemd has made the scope and moved it in.
            while self.relative not in _read(Path(f"/proc/{keeper.pid}/cgroup")):
                if keeper.poll() is not None:
                    errors.seek(0)
                    said = (
                        errors.read().decode(errors="replace").strip() or f"exit status {keeper.returncode}"
                    )
                    if self.exists():  # another process of ours made it first
                        return
                    raise DriverError(f"cannot make the systemd scope {self.unit}: {said}")
                if time.monotonic() > deadline:
                    keeper.kill()
                    raise DriverError(f"systemd did not make the scope {self.unit} within {timeout:g} s")
                time.sleep(0.01)
        log.info("made systemd scope %s for the sandboxes (keeper pid %d)", self.unit, keeper.pid)

    def _prepare(self) -> None:
        """Keeper into its leaf, so that the scope's cgroup may enable controllers for the cgroups
        below it (Cgroup.create enables them), and a check that systemd delegated those."""
        keeper_dir = self.path / KEEPER
        try:
            keeper_dir.mkdir(exist_ok=True)
            for pid in _read(self.path / "cgroup.procs").split():
                with contextlib.suppress(ProcessLookupError):
                    (keeper_dir / "cgroup.procs").write_text(pid)
        except OSError as error:
            raise DriverError(f"cannot move the keeper of {self.unit} into {keeper_dir}: {error}") from None
        available = set(_read(self.path / "cgroup.controllers").split())
        missing = [c for c in V2_CONTROLLERS if c not in available]
        if missing:
            raise DriverError(
                f"systemd did not delegate the cgroup controllers {' '.join(missing)} to {self.unit}; "
                "check that they are enabled on the host (/sys/fs/cgroup/cgroup.controllers)"
            )

    def _holds_more_than_the_keeper(self) -> bool:
        with contextlib.suppress(OSError):
            for child in self.path.iterdir():
                # cgroup.events says whether any process is left anywhere below a cgroup.
                if (
                    child.is_dir()
                    and child.name != KEEPER
                    and "populated 1" in _read(child / "cgroup.events")
                ):
                    return True
        return bool(_read(self.path / "cgroup.procs").split())

    def _directories_below(self) -> list[Path]:
        # systemd removes the scope's cgroup the moment it sees it empty: the walk may find it gone.
        try:
            return [path for path in self.path.rglob("*") if path.is_dir()]
        except OSError:
            return []

    def release(self, timeout: float = 10.0) -> bool:
        """End the scope when nothing but its keeper is left in it (True when it is gone)."""
        if not self.exists():
            return True
        if self._holds_more_than_the_keeper():
            return False
        keepers = [int(pid) for pid in _read(self.path / KEEPER / "cgroup.procs").split()]
        for pid in keepers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # systemd notices the empty scope and removes it with its cgroup; our own empty children
        # go first, so that nothing of ours keeps it.
        deadline = time.monotonic() + timeout
        while self.exists():
            for pid in keepers:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # our own child when this server made the scope
            for directory in sorted(
                self._directories_below(), key=lambda path: len(path.parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            if time.monotonic() > deadline:
                log.warning("systemd has not removed scope %s after %g s", self.unit, timeout)
                return False
            time.sleep(0.02)
        return True


def for_host(cgroup_root: Path, scope: str) -> DelegatedScope | None:
    """The scope the sandboxes of `scope` live in, or None where we own the tree (no systemd, v1)."""
    return DelegatedScope(cgroup_root, unit_name(scope)) if systemd_manages(cgroup_root) else None
