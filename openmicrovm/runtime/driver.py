"""The sandbox driver interface: what every isolation mechanism offers to the layers above.

A sandbox is one isolated copy of an image's application. The builder starts one, waits for it to
be ready and snapshots it; the lifecycle layer restores MicroVMs from that snapshot, suspends,
resumes and destroys them. Nothing here knows about images, accounts or the API.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cgroups import Cgroup


class DriverError(Exception):
    """A sandbox operation failed; the message names the cause in words a user can act on."""


class SnapshotError(DriverError):
    """A snapshot is missing, unreadable or could not be written."""


class CapacityError(DriverError):
    """The host lacks the memory (or other resource) a sandbox needs."""


class PortNotListening(DriverError):
    """Nothing inside the sandbox accepts connections on the requested port."""


class TooManyConnections(DriverError):
    """The sandbox already relays as many connections as it takes at once (connect() of the gvisor
    driver: the guest agent's limit, agent_client.MAX_RELAYED_CONNECTIONS). Nothing is wrong with
    the sandbox: try again once a connection has closed. The endpoint answers 429."""


@dataclass(frozen=True)
class ProcessConfig:
    """The application process, as an OCI image config describes it (entrypoint + cmd resolved)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    # "uid", "uid:gid", "name" or "name:group", resolved against the rootfs' /etc/passwd and /etc/group.
    user: str = "0"


@dataclass(frozen=True)
class SandboxSpec:
    rootfs: Path  # read-only image root filesystem; every sandbox writes to its own layer above it
    process: ProcessConfig
    memory_mib: int = 2048
    vcpus: float = 1.0
    pids_max: int = 1024
    # False: the reduced capability set of spec §5.8 with no_new_privs; True: every capability.
    all_capabilities: bool = False
    hostname: str = "microvm"
    # Outbound connections to the internet (a MicroVM's INTERNET_EGRESS connector); never to the
    # host, link-local, other sandboxes or operator-denied networks. Drivers without
    # DriverCapabilities.internet_egress run the sandbox without egress.
    egress: bool = False
    # How the rootfs is owned on the host: container id N is host id rootfs_id_base + N
    # (openmicrovm.idmap). 0: owned by the container's own ids (versions built before builds ran in
    # a user namespace). Drivers show the files to the app with container ids either way.
    rootfs_id_base: int = 0


@dataclass(frozen=True)
class DriverCapabilities:
    # True when restore() continues from the snapshot's memory (every process, every variable).
    # False when a "snapshot" holds the filesystem only and restore() cold-starts the app.
    memory_snapshot: bool
    # True when suspend() writes memory to disk and frees the RAM; False when it only freezes.
    suspend_releases_memory: bool
    # True when SandboxSpec.egress gives the sandbox outbound network (see runtime/egress.py).
    internet_egress: bool = False


@dataclass
class Sandbox:
    """A handle on a live (or suspended) sandbox. Drivers may keep private data in `extra`."""

    sandbox_id: str
    driver: str
    state_dir: Path
    spec: SandboxSpec
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Strays:
    """What a driver found on the host of sandboxes it no longer keeps, as of one moment: removing
    them touches nothing made after it, so a server may serve while its strays go."""

    sandboxes: tuple[Sandbox, ...] = ()  # those with a state dir
    keys: frozenset[str] = frozenset()  # the host names of every one, and of objects without a state dir

    @property
    def ids(self) -> list[str]:
        return [sandbox.sandbox_id for sandbox in self.sandboxes]


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    memory_bytes: int  # bytes of memory state on disk (0 where the driver cannot snapshot memory)
    disk_bytes: int  # bytes written by the app to its writable layer before the snapshot
    code_bytes: int  # size of the image root filesystem


@dataclass(frozen=True)
class SandboxStats:
    rss_bytes: int
    cpu_seconds: float


@dataclass(frozen=True)
class AppStatus:
    """What became of the application inside a sandbox."""

    # "running", "exited" (exit_status set), "failed" (could not be started), "suspended", or
    # "stopped" (the sandbox itself is gone, e.g. killed at its memory limit).
    state: str
    exit_status: int | None = None
    # True when the sandbox's memory limit killed a process (the app, a command, or, under gVisor,
    # the whole sandbox).
    oom_killed: bool = False
    # Words for a user: what happened and the last lines the app printed.
    detail: str = ""


class PtySession(abc.ABC):
    """An interactive terminal inside a sandbox."""

    @abc.abstractmethod
    async def read(self) -> bytes:
        """Terminal output; b"" once the command has exited and all output was read."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def resize(self, rows: int, cols: int) -> None: ...

    @abc.abstractmethod
    async def wait(self) -> int:
        """The command's exit status."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class SandboxDriver(abc.ABC):
    name: str
    capabilities: DriverCapabilities

    @abc.abstractmethod
    async def start(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        """Create and start a sandbox running spec.process. Raises DriverError naming the cause
        (missing entrypoint, app exited at once with its status and last output, ...)."""

    @abc.abstractmethod
    async def connect(self, sandbox: Sandbox, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to `port` inside the sandbox; the app may listen on 127.0.0.1 only.
        Raises PortNotListening when nothing accepts on that port."""

    @abc.abstractmethod
    async def snapshot(self, sandbox: Sandbox, snapshot_dir: Path) -> SnapshotInfo:
        """Write the sandbox's state to snapshot_dir. The sandbox is destroyed afterwards."""

    @abc.abstractmethod
    async def restore(self, sandbox_id: str, snapshot_dir: Path, *, egress: bool = False) -> Sandbox:
        """A new sandbox from a snapshot; any number of sandboxes may be restored from one snapshot.
        egress: give it outbound network (SandboxSpec.egress), where the driver can.
        Raises SnapshotError when the snapshot is missing or corrupt, CapacityError when the host is
        short of memory."""

    @abc.abstractmethod
    async def suspend(self, sandbox: Sandbox) -> None:
        """Stop the sandbox from running; release its RAM where capabilities say so."""

    @abc.abstractmethod
    async def resume(self, sandbox: Sandbox) -> None:
        """Continue a suspended sandbox with its memory intact."""

    @abc.abstractmethod
    async def exec_pty(
        self,
        sandbox: Sandbox,
        argv: list[str],
        env: dict[str, str] | None = None,
        rows: int = 24,
        cols: int = 80,
    ) -> PtySession: ...

    @abc.abstractmethod
    async def stats(self, sandbox: Sandbox) -> SandboxStats: ...

    @abc.abstractmethod
    async def app_status(self, sandbox: Sandbox) -> AppStatus:
        """Whether the app is alive, its exit status, and whether the memory limit struck."""

    @abc.abstractmethod
    def is_suspended(self, sandbox: Sandbox) -> bool:
        """True between suspend() and resume() (also for a handle from adopt())."""

    async def wait_exit(self, sandbox: Sandbox, interval: float = 2.0) -> AppStatus:
        """Return once the sandbox's app has stopped for good, with its final AppStatus: "exited"
        or "failed" (the app ended; the sandbox is still there), or "stopped" (the sandbox itself
        died, e.g. killed at its memory limit: oom_killed says so, detail has the words and the
        last output). Never returns while the app runs or the sandbox is suspended, suspending or
        resuming: a suspended sandbox is not a dead one, and watching goes on after resume().
        After destroy() it returns AppStatus("stopped", detail="the sandbox was destroyed").

        Meant to run as one background task per live sandbox, started after start(), restore()
        or adopt() and cancelled (or left to see the destroy) when the sandbox is destroyed:

            watcher = asyncio.create_task(driver.wait_exit(sandbox))
            watcher.add_done_callback(...)  # the MicroVM died: mark it, destroy the sandbox

        It costs next to nothing: the drivers read the sandbox's cgroup every `interval` seconds
        (a dead sandbox is seen within that) and keep one idle connection to the guest agent,
        which answers the moment the app exits. This default asks app_status() every interval."""
        while True:
            status = await self.app_status(sandbox)
            if status.state in ("exited", "failed", "stopped"):
                return status
            await asyncio.sleep(interval)

    async def job_cgroup(self, name: str, memory_mib: int) -> Cgroup | None:
        """A cgroup of its own for work the server runs beside its sandboxes (a Dockerfile build),
        with a memory and pids limit, where this driver keeps its sandboxes' cgroups (so a crash's
        leftovers are swept with theirs). The caller puts its processes in and removes it at the
        end, which kills whatever is left inside. None: this driver keeps no cgroups."""
        return None

    async def close(self) -> None:
        """Stop the driver's background work (timers, warm pools) and destroy what only that work
        holds. Sandboxes stay: they outlive a server restart. Call it when the server stops."""
        return None  # a driver without background work has nothing to stop

    def log_path(self, sandbox: Sandbox) -> Path:
        """The file receiving the app's stdout and stderr (appended across suspend/resume)."""
        return sandbox.state_dir / "app.log"

    @abc.abstractmethod
    async def destroy(self, sandbox: Sandbox) -> None:
        """Remove everything the sandbox owns (processes, netns, cgroups, mounts, state dir).
        Safe to call twice and on a half-created sandbox."""

    @abc.abstractmethod
    async def adopt(self, sandbox_id: str) -> Sandbox | None:
        """After a server restart: a handle on a sandbox that still exists (running or suspended),
        or None when it is gone."""

    @abc.abstractmethod
    async def cleanup_strays(self, keep: set[str]) -> list[str]:
        """Destroy every sandbox this driver finds on the host whose id is not in `keep` (left by a
        crashed server); returns the ids removed."""

    @abc.abstractmethod
    async def find_strays(self, keep: set[str]) -> Strays:
        """cleanup_strays in two steps, for a server that serves meanwhile: first what to remove
        (every sandbox and host object not of `keep`, as of now)..."""

    @abc.abstractmethod
    async def remove_strays(self, strays: Strays) -> list[str]:
        """...then remove exactly that; returns the ids removed."""
