"""Control groups for sandboxes: memory, CPU and pids limits, freezing, usage, and cleanup.

Both layouts are supported. cgroup v2 (one unified tree: memory.max, cpu.max, pids.max,
cgroup.freeze) is what most current distributions use; cgroup v1 (one tree per controller:
memory.limit_in_bytes, cpu.cfs_quota_us, pids.max, freezer.state) is what our Debian machines
run in "hybrid" mode, where /sys/fs/cgroup/unified is a v2 tree without controllers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .driver import DriverError

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
V2_CONTROLLERS = ("memory", "cpu", "pids")
# The name (comm) of omv-shim, the keeper every sandbox's processes are re-parented to
# (agent/shim.c), and how long kill_all lets keepers exit on their own once the rest are gone.
# A process that only calls itself so is killed after the grace all the same.
KEEPER_COMM = "omv-shim"
KEEPER_GRACE_SECONDS = 1.0


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    vcpus: float
    pids_max: int


@dataclass(frozen=True)
class Layout:
    version: int
    # v1: controller -> mount point of its hierarchy; v2: {"unified": root}
    mounts: dict[str, Path]
    # Where our cgroups go below each root: "" where the tree is ours (v1, or v2 without systemd),
    # else the cgroup systemd delegated to us (see cgroup_scope).
    base: str = ""
    # Every mounted cgroup hierarchy, noted once (None: read /proc/self/mountinfo each time).
    # Reading mountinfo takes the kernel's mount lock, which a mass teardown's namespace
    # unmounts hold: on the event loop, each read stalled the API.
    hierarchies: tuple[Path, ...] | None = None

    def dirs(self, relative: str) -> list[Path]:
        """One directory per distinct hierarchy (cpu and cpuacct may share one)."""
        seen: list[Path] = []
        for mount in self.mounts.values():
            path = mount / self.base / relative
            if path not in seen:
                seen.append(path)
        return seen

    def everywhere(self, relative: str) -> list[Path]:
        """`relative` in our hierarchies and, on v1, in every other mounted one: runtimes (runsc)
        also create our paths in controllers we do not use (cpuset, devices, blkio, ...) and
        leave them behind there. Pure v2 has one hierarchy."""
        paths = self.dirs(relative)
        if self.version == 1:
            mounts = self.hierarchies if self.hierarchies is not None else all_hierarchies()
            paths += [mount / relative for mount in mounts if mount / relative not in paths]
        return paths

    def controller_dir(self, controller: str, relative: str) -> Path:
        mount = self.mounts["unified"] if self.version == 2 else self.mounts[controller]
        return mount / self.base / relative


def _v1_mounts(mountinfo: str) -> dict[str, Path]:
    mounts: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3 or rest[0] != "cgroup":
            continue
        options = set(rest[2].split(","))
        for controller in V1_CONTROLLERS:
            if controller in options and controller not in mounts:
                mounts[controller] = Path(fields[4])
    return mounts


def detect() -> Layout | None:
    """The cgroup layout of this host, or None when the controllers we need are missing."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        available = set((CGROUP_ROOT / "cgroup.controllers").read_text().split())
        if not set(V2_CONTROLLERS) <= available:
            return None
        return Layout(2, {"unified": CGROUP_ROOT})
    try:
        mounts = _v1_mounts(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return None
    if not set(V1_CONTROLLERS) <= set(mounts):
        return None
    return Layout(1, mounts, hierarchies=tuple(all_hierarchies()))


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as error:
        raise DriverError(f"cannot write {value!r} to {path}: {error.strerror}") from None


def _read_keyed(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[key] = int(value)
    except OSError:
        pass
    return values


# How often a v1 freeze that has not completed is asked for again (see Cgroup.freeze).
_FREEZE_RETRY_SECONDS = 0.5


class Cgroup:
    """One sandbox's cgroup, `relative` below the root of every hierarchy."""

    def __init__(self, layout: Layout, relative: str) -> None:
        self.layout = layout
        self.relative = relative

    @property
    def path(self) -> str:
        """The cgroup path as runtimes spell it (OCI linux.cgroupsPath)."""
        return "/" + "/".join(part for part in (self.layout.base, self.relative) if part)

    def exists(self) -> bool:
        return any(path.is_dir() for path in self.layout.dirs(self.relative))

    def procs_files(self) -> list[Path]:
        """Files a launcher writes its pid to, so that it and all it starts are inside."""
        return [path / "cgroup.procs" for path in self.layout.dirs(self.relative)]

    def create(self, limits: Limits) -> None:
        if self.layout.version == 2:
            self._enable_v2_controllers()
        for path in self.layout.dirs(self.relative):
            path.mkdir(parents=True, exist_ok=True)
        quota = max(1000, int(limits.vcpus * CPU_PERIOD_US))
        if self.layout.version == 1:
            memory = self.layout.controller_dir("memory", self.relative)
            _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
            # Without this a host with swap would let the sandbox swap instead of hitting its limit.
            if (memory / "memory.memsw.limit_in_bytes").exists():
                _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            cpu = self.layout.controller_dir("cpu", self.relative)
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(quota))
            _write(cpu / "cpu.shares", str(max(2, int(1024 * limits.vcpus))))
        else:
            base = self.layout.controller_dir("memory", self.relative)
            _write(base / "memory.max", str(limits.memory_bytes))
            if (base / "memory.swap.max").exists():
                _write(base / "memory.swap.max", "0")
            _write(base / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            _write(base / "cpu.weight", str(max(1, min(10000, int(100 * limits.vcpus)))))
        _write(self.layout.controller_dir("pids", self.relative) / "pids.max", str(limits.pids_max))

    def _enable_v2_controllers(self) -> None:
        # In v2 a controller works in a cgroup only when every ancestor delegates it.
        wanted = " ".join(f"+{c}" for c in V2_CONTROLLERS)
        current = self.layout.mounts["unified"] / self.layout.base
        for part in Path(self.relative).parts[:-1]:
            enabled = set((current / "cgroup.subtree_control").read_text().split())
            if not set(V2_CONTROLLERS) <= enabled:
                _write(current / "cgroup.subtree_control", wanted)
            current = current / part
            current.mkdir(exist_ok=True)
        enabled = set((current / "cgroup.subtree_control").read_text().split())
        if not set(V2_CONTROLLERS) <= enabled:
            _write(current / "cgroup.subtree_control", wanted)

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in self.procs_files():
            with contextlib.suppress(OSError):
                found.update(int(line) for line in path.read_text().split())
        return sorted(found)

    # ---------------------------------------------------------------- freezing

    def _freeze_file(self) -> Path:
        if self.layout.version == 1:
            return self.layout.controller_dir("freezer", self.relative) / "freezer.state"
        return self.layout.controller_dir("memory", self.relative) / "cgroup.freeze"

    def is_frozen(self) -> bool:
        try:
            if self.layout.version == 1:
                return self._freeze_file().read_text().strip() == "FROZEN"
            events = _read_keyed(self.layout.controller_dir("memory", self.relative) / "cgroup.events")
            return events.get("frozen") == 1
        except OSError:
            return False

    async def freeze(self, timeout: float = 10.0) -> None:
        request = "FROZEN" if self.layout.version == 1 else "1"
        _write(self._freeze_file(), request)
        # Freezing is asynchronous: tasks stop at their next return to user space. A v1 freezer
        # can stay FREEZING when a task missed its chance (it was busy in the kernel, e.g. between
        # ptrace stops); the kernel's freezer docs told userspace to retry or thaw then, and runc
        # retries too: writing FROZEN again makes it try those tasks again, every
        # _FREEZE_RETRY_SECONDS while waiting.
        started = time.monotonic()
        retried = started
        while not self.is_frozen():
            now = time.monotonic()
            if now - started > timeout:
                self.thaw()
                raise DriverError(f"cgroup {self.relative} did not freeze within {timeout:g} s")
            if self.layout.version == 1 and now - retried > _FREEZE_RETRY_SECONDS:
                _write(self._freeze_file(), request)
                retried = now
            await asyncio.sleep(0.001)

    def thaw(self) -> None:
        _write(self._freeze_file(), "THAWED" if self.layout.version == 1 else "0")

    # ---------------------------------------------------------------- usage

    def memory_bytes(self) -> int:
        """Working set: usage minus page cache the kernel can drop at once (as kubelet counts)."""
        memory = self.layout.controller_dir("memory", self.relative)
        stat = _read_keyed(memory / "memory.stat")
        try:
            if self.layout.version == 1:
                usage = int((memory / "memory.usage_in_bytes").read_text())
                inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
            else:
                usage = int((memory / "memory.current").read_text())
                inactive = stat.get("inactive_file", 0)
        except (OSError, ValueError):
            return 0
        return max(0, usage - inactive)

    def cpu_seconds(self) -> float:
        try:
            if self.layout.version == 1:
                return (
                    int((self.layout.controller_dir("cpuacct", self.relative) / "cpuacct.usage").read_text())
                    / 1e9
                )
            stat = _read_keyed(self.layout.controller_dir("cpu", self.relative) / "cpu.stat")
            return stat.get("usage_usec", 0) / 1e6
        except (OSError, ValueError):
            return 0.0

    def oom_kills(self) -> int:
        memory = self.layout.controller_dir("memory", self.relative)
        if self.layout.version == 1:
            return _read_keyed(memory / "memory.oom_control").get("oom_kill", 0)
        return _read_keyed(memory / "memory.events").get("oom_kill", 0)

    # ---------------------------------------------------------------- teardown

    async def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process inside and wait until none is left. A sandbox's keeper (a child
        subreaper, see KEEPER_COMM) goes last: it reaps the others the moment they die and then
        exits by itself. Killed with them, it would leave them zombies for the host's init, which
        on some hosts reaps only now and then, and `runsc delete` waits for each zombie sandbox."""
        if not await asyncio.to_thread(self.exists):
            return
        deadline = time.monotonic() + timeout
        keepers_until: float | None = None  # when the keepers' grace to exit on their own ends
        while True:
            keepers_too = keepers_until is not None and time.monotonic() > keepers_until
            pids, only_keepers = await asyncio.to_thread(self._kill_round, keepers_too)
            if not pids:
                return
            if only_keepers and keepers_until is None:
                keepers_until = time.monotonic() + KEEPER_GRACE_SECONDS
            if time.monotonic() > deadline:
                raise DriverError(
                    f"processes {pids} in cgroup {self.relative} survived SIGKILL for {timeout:g} s"
                )
            await asyncio.sleep(0.005)

    def _kill_round(self, keepers_too: bool) -> tuple[list[int], bool]:
        """One round of kill_all, on a thread: cgroup files wait on the kernel's cgroup lock
        while other cgroups are being torn down, and the event loop must not. Returns the
        processes found and whether only keepers were among them."""
        pids = self.pids()
        if not pids:
            return pids, False
        keepers = [pid for pid in pids if _comm(pid) == KEEPER_COMM]
        targets = [pid for pid in pids if pid not in keepers]
        only_keepers = not targets
        if only_keepers and keepers_too:
            targets = keepers
        kill_file = self.layout.controller_dir("memory", self.relative) / "cgroup.kill"
        if targets and not keepers and self.layout.version == 2 and kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")  # also catches what forks meanwhile
        else:
            for pid in targets:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # A task frozen in v1 dies only once thawed, and a frozen keeper reaps nothing.
        with contextlib.suppress(DriverError, OSError):
            if self.is_frozen():
                self.thaw()
        return pids, only_keepers

    async def remove(self, timeout: float = 10.0) -> None:
        """Kill what is inside and remove the cgroup from every mounted hierarchy: ours, and the
        ones runtimes (runsc) also create it in (blkio, cpuset, devices, name=systemd, ...), where
        a crash leaves it behind. Directories a runtime made below it go too. The removals run on
        a thread (see _kill_round)."""
        await self.kill_all(timeout)
        deadline = time.monotonic() + timeout
        paths = self.layout.everywhere(self.relative)
        while (busy := await asyncio.to_thread(_remove_trees, paths)) is not None:
            # EBUSY for a moment while the last task is being torn down.
            if time.monotonic() > deadline:
                path, error = busy
                raise DriverError(f"cannot remove cgroup {path}: {error.strerror} ({_occupants(path)})")
            await asyncio.sleep(0.01)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""


def _remove_trees(paths: list[Path]) -> tuple[Path, OSError] | None:
    """rmdir each cgroup directory and the ones below it, children first. Returns the first
    directory still busy (EBUSY, ENOTEMPTY) and its error, for the caller to try again; any other
    failure is a DriverError."""
    for path in paths:
        try:
            below = [entry for entry in path.iterdir() if entry.is_dir()]
        except FileNotFoundError:
            continue
        except OSError:
            below = []
        if (busy := _remove_trees(below)) is not None:
            return busy
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as error:
            if error.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise DriverError(
                    f"cannot remove cgroup {path}: {error.strerror} ({_occupants(path)})"
                ) from None
            return path, error
    return None


def _occupants(path: Path) -> str:
    """What keeps a cgroup busy, for error messages: its tasks and their states."""
    words = []
    for name in ("tasks", "cgroup.procs"):
        with contextlib.suppress(OSError):
            for pid in (path / name).read_text().split():
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    state, comm = "?", "?"
                words.append(f"{name} {pid} {comm} {state}")
    return ", ".join(words) or "no tasks listed; an unreaped zombie may hold it"


def children(layout: Layout, parent: str) -> list[str]:
    """Names of the cgroups directly below `parent`, in any hierarchy of ours."""
    names: set[str] = set()
    for path in layout.dirs(parent):
        with contextlib.suppress(OSError):
            names.update(entry.name for entry in path.iterdir() if entry.is_dir())
    return sorted(names)


def children_everywhere(layout: Layout, parent: str) -> list[str]:
    """Names of the cgroups directly below `parent` in every mounted hierarchy: ours and the ones
    only runtimes create cgroups in (see Layout.everywhere)."""
    names: set[str] = set()
    for path in layout.everywhere(parent):
        with contextlib.suppress(OSError):
            names.update(entry.name for entry in path.iterdir() if entry.is_dir())
    return sorted(names)


def all_hierarchies() -> list[Path]:
    """Every cgroup mount point: runtimes (runsc) also create our paths in controllers we do not use
    (cpuset, devices, blkio, ...) and leave the parents behind there."""
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) >= 5 and rest and rest[0] in ("cgroup", "cgroup2"):
                points.append(Path(fields[4]))
    return points


def v1_controller_mount(controller: str) -> Path | None:
    """The mount point of a cgroup v1 controller's hierarchy (e.g. `devices`, which the limits above
    do not use), or None where it is not mounted (cgroup v2 has no such controller)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if (
                len(fields) >= 5
                and len(rest) >= 3
                and rest[0] == "cgroup"
                and controller in rest[2].split(",")
            ):
                return Path(fields[4])
    return None


def leftover_dirs(layout: Layout, parent: str) -> list[Path]:
    return [path for path in layout.everywhere(parent) if path.is_dir()]


def remove_parent_if_empty(layout: Layout, parent: str) -> None:
    """rmdir `parent` in every hierarchy where it has no children left (cheap; fails harmlessly)."""
    for path in layout.everywhere(parent):
        with contextlib.suppress(OSError):
            path.rmdir()
