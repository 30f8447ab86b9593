"""What `openmicrovm doctor` looks at on this machine: tools, sandbox drivers, cgroups, disk.

Which drivers can run is the runtime's word (runtime/host_report.describe_host), with the drivers
configured as the settings say.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openmicrovm.config import Settings
from openmicrovm.runtime import cgroup_scope, cgroups
from openmicrovm.runtime.host_report import describe_host

OK, WARN, FAIL = "ok", "warn", "FAIL"
# Binary, Debian package, why it matters, and whether the server cannot work without it.
TOOLS = (
    ("buildah", "buildah", "runs the Dockerfile of every build", True),
    ("debootstrap", "debootstrap", "makes the base root filesystem", True),
    ("runsc", "runsc", "gVisor sandboxes with memory snapshots", False),
    ("bwrap", "bubblewrap", "process sandboxes (used when runsc is missing)", False),
)
FREE_DISK_WARN = 5 * 1024**3
FREE_DISK_FAIL = 1024**3
_PACKAGE = re.compile(r"apt-get install ([a-z0-9.+ -]+)\)")


@dataclass
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str
    packages: tuple[str, ...] = ()  # what `apt-get install` would fix

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
            "install": list(self.packages),
        }


def _runsc_in_use() -> str | None:
    """The runsc the gvisor driver will use (a newer one in the cache beats the Debian package)."""
    try:
        from openmicrovm.runtime import runsc

        chosen = runsc.choose()
    except Exception:
        return None
    return f"{chosen.path} (runsc {chosen.version}, {runsc.choose_platform(chosen)} platform)"


def tool_checks() -> list[Check]:
    checks = []
    for binary, package, purpose, required in TOOLS:
        path = shutil.which(binary)
        if binary == "runsc" and path:
            path = _runsc_in_use() or path
        if path:
            checks.append(Check(binary, OK, f"{path}: {purpose}"))
        else:
            checks.append(Check(binary, FAIL if required else WARN, f"missing: {purpose}", (package,)))
    return checks


def driver_check(settings: Settings) -> Check:
    """Which sandbox driver the server will use, given its settings (`driver` and the drivers' own)."""
    report = asyncio.run(describe_host(settings))
    available, default = dict(report.drivers), report.default_driver
    configured = settings.driver
    chosen = default if configured == "auto" else configured
    others = "; ".join(f"{name}: {state}" for name, state in available.items() if name != chosen)
    if chosen is None or available.get(chosen, "unknown driver") != "available":
        why = available.get(chosen or "", "") if chosen else "no driver can run here"
        packages = tuple(sorted({p for state in available.values() for p in _packages(state)}))
        return Check(
            "sandbox driver",
            # The server runs as root; a user's view of its drivers is only a hint.
            FAIL if os.geteuid() == 0 else WARN,
            f"{chosen or 'none'} cannot run: {why or 'unknown driver'}; {others}",
            packages,
        )
    return Check(
        "sandbox driver", OK, f"{chosen} (driver = {configured})" + (f"; {others}" if others else "")
    )


def _packages(text: str) -> list[str]:
    found: list[str] = []
    for match in _PACKAGE.finditer(text):
        found += match.group(1).split()
    return found


def cgroup_check(root: Path = Path("/sys/fs/cgroup"), mounts_file: Path = Path("/proc/self/mounts")) -> Check:
    try:
        mounts = [line.split() for line in mounts_file.read_text().splitlines()]
    except OSError as error:
        return Check("cgroups", FAIL, f"cannot read {mounts_file}: {error.strerror}")
    types = {fields[1]: fields[2] for fields in mounts if len(fields) > 2}
    v1 = sorted({Path(point).name for point, kind in types.items() if kind == "cgroup"})
    if types.get(str(root)) == "cgroup2":
        controllers = (
            (root / "cgroup.controllers").read_text().split()
            if (root / "cgroup.controllers").exists()
            else []
        )
        return _v2_check(root, controllers)
    if v1:
        hybrid = types.get(str(root / "unified")) == "cgroup2"
        layout = (
            f"v1 (hybrid: the v2 tree at {root / 'unified'} has no controllers)" if hybrid else "v1 (legacy)"
        )
        missing = {"memory", "cpu", "pids", "freezer"} - set(" ".join(v1).replace(",", " ").split())
        if missing:
            return Check("cgroups", FAIL, f"{layout}; missing controllers: {' '.join(sorted(missing))}")
        owner = (
            "systemd runs here but does not delegate v1 hierarchies; sandboxes' cgroups are made "
            "at each hierarchy's root (openmicrovm-*)"
            if cgroup_scope.SYSTEMD_RUNTIME_DIR.is_dir()
            else "not delegated: no systemd manages the tree, so sandboxes' cgroups are made at each "
            "hierarchy's root (openmicrovm-*)"
        )
        return Check("cgroups", OK, f"{layout}; controllers: {' '.join(v1)}; {owner}")
    return Check(
        "cgroups", FAIL, "no cgroup file system is mounted; sandboxes need cgroups for limits and freezing"
    )


def _v2_check(root: Path, controllers: list[str]) -> Check:
    layout = f"v2 (unified) at {root}; controllers: {' '.join(controllers) or 'none'}"
    missing = [c for c in cgroups.V2_CONTROLLERS if c not in controllers]
    if missing:
        return Check("cgroups", FAIL, f"{layout}; missing controllers: {' '.join(missing)}")
    if not cgroup_scope.systemd_manages(root):
        return Check(
            "cgroups", OK, f"{layout}; not delegated: no systemd manages the tree, so sandboxes' cgroups "
            "are made at its root (openmicrovm-*)",
        )  # fmt: skip
    if shutil.which("systemd-run") is None:
        return Check(
            "cgroups", FAIL, f"{layout}; systemd manages the tree, but systemd-run, which makes the "
            "delegated scope for sandboxes, is missing (apt-get install systemd)",
        )  # fmt: skip
    return Check(
        "cgroups", OK, f"{layout}; delegated: systemd manages the tree, and sandboxes go into a "
        f"scope of their own with Delegate=yes ({cgroup_scope.SLICE}/openmicrovm-<data dir>.scope)",
    )  # fmt: skip


def _existing_ancestor(path: Path) -> Path:
    while path != path.parent:
        # A directory this user may not enter (a root server's data dir) counts as not there: its
        # nearest visible ancestor is most likely on the same file system.
        with contextlib.suppress(PermissionError):
            if path.exists():
                return path
        path = path.parent
    return path


def disk_check(label: str, folder: Path) -> Check:
    where = _existing_ancestor(folder)
    try:
        free = shutil.disk_usage(where).free
    except OSError as error:
        return Check(label, FAIL, f"{folder}: {error.strerror}")
    text = f"{folder}: {free / 1024**3:.1f} GiB free"
    if not os.access(where, os.W_OK):
        return Check(label, WARN, text + f" ({where} is not writable by this user)")
    if free < FREE_DISK_FAIL:
        return Check(label, FAIL, text + "; builds and snapshots need a few GiB")
    if free < FREE_DISK_WARN:
        return Check(label, WARN, text + "; builds and snapshots need a few GiB")
    return Check(label, OK, text)


def privilege_check() -> Check:
    if os.geteuid() == 0:
        return Check("privileges", OK, "root")
    return Check("privileges", WARN, "not root: the server needs root for namespaces, cgroups and mounts")


def build_jail_check() -> Check:
    """Start the build jail (builder/build_jail.py) for real and run `true` in it: it needs root,
    user namespaces and a few mounts, all of which a host can deny."""
    if os.geteuid() != 0:
        return Check("build jail", WARN, "not root: builds cannot be jailed")
    import subprocess
    import tempfile

    from openmicrovm.builder import build_jail

    with tempfile.TemporaryDirectory(prefix="openmicrovm-doctor-") as scratch:
        dirs = [build_jail.prepare_owned_dir(Path(scratch) / name) for name in ("storage", "run", "tmp")]
        spec = build_jail.JailSpec(storage=str(dirs[0]), runroot=str(dirs[1]), tmpdir=str(dirs[2]))
        try:
            result = subprocess.run(
                build_jail.command(spec, ["true"]), capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return Check("build jail", FAIL, f"could not start it: {error}")
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return Check(
            "build jail",
            FAIL,
            f"{reason}: builds need user namespaces (sysctl user.max_user_namespaces > 0) and mounts",
        )
    return Check(
        "build jail",
        OK,
        f"Dockerfiles run in a user namespace as host ids {build_jail.ID_BASE}..{build_jail.ID_BASE + 65535}",
    )
