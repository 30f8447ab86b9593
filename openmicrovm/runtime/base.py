"""What both drivers share: state directories, records, admission, the agent, teardown.

Layout under a driver's state root:
    sandboxes/<sandbox id>/record.json   what the sandbox is (spec, host key, agent secret, state)
    sandboxes/<sandbox id>/app.log       the app's stdout and stderr
    sandboxes/<sandbox id>/...           driver-specific (bundle, writable layer, suspend image)
A snapshot directory holds snapshot.json plus driver-specific files; it belongs to the caller and
is never removed by a driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from openmicrovm.private_files import write_private_file

from . import agent_client, cgroup_scope, cgroups, names, netns, proc, rootfs
from .agent_client import AgentAddress
from .driver import (
    AppStatus,
    DriverError,
    ProcessConfig,
    PtySession,
    Sandbox,
    SandboxDriver,
    SandboxSpec,
    SandboxStats,
    SnapshotError,
)
from .host import MIB, MemoryGate

log = logging.getLogger("openmicrovm.runtime")

SNAPSHOT_FORMAT = 1
RECORD_FILE = "record.json"
SNAPSHOT_FILE = "snapshot.json"
MIN_MEMORY_MIB = 64
# Processes a job cgroup (a Dockerfile build: buildah, its RUN steps) may hold: room for parallel
# compilers and package managers, not for a fork bomb.
JOB_PIDS_MAX = 4096


def spec_to_dict(spec: SandboxSpec) -> dict[str, Any]:
    data = asdict(spec)
    data["rootfs"] = str(spec.rootfs)
    return data


def spec_from_dict(data: dict[str, Any]) -> SandboxSpec:
    process = ProcessConfig(**data["process"])
    fields = {key: value for key, value in data.items() if key not in ("rootfs", "process")}
    return SandboxSpec(rootfs=Path(data["rootfs"]), process=process, **fields)


@dataclass
class SandboxRecord:
    sandbox_id: str
    driver: str
    spec: SandboxSpec
    key: str  # names the sandbox's host objects (names.host_names)
    token: str  # the agent's secret
    agent_binary: str
    # starting | running | suspended, and the transitions in between, written before they begin so
    # that adopt() after a crash knows which side of one a sandbox is on: suspending (a freeze or a
    # checkpoint to disk under way), resuming (a thaw or a restore from disk under way). gvisor
    # also has warm (a pool sandbox, pool.py).
    state: str = "starting"
    # suspended: "memory" (frozen) or "disk" (checkpointed); suspending: the tier being entered;
    # resuming: the tier being left.
    suspended_in: str = ""
    footprint_bytes: int = 0  # memory in use when last snapshotted or suspended
    # gvisor: the runsc binary the sandbox runs under and its platform (both empty in records
    # written before the driver could choose: those run under the runsc on PATH, on ptrace).
    runsc: str = ""
    runsc_platform: str = ""
    # gvisor: the slot of the sandbox's egress uplink (runtime/egress.py), -1 without one.
    uplink: int = -1

    def to_json(self) -> str:
        data = asdict(self)
        data["spec"] = spec_to_dict(self.spec)
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> SandboxRecord:
        data = json.loads(text)
        data["spec"] = spec_from_dict(data["spec"])
        return cls(**data)


@dataclass(frozen=True)
class SnapshotMeta:
    driver: str
    spec: SandboxSpec
    token: str
    footprint_bytes: int
    disk_bytes: int
    # gvisor: the version of the runsc that wrote the checkpoint (only that version restores it)
    # and its platform; both empty in snapshots made before the driver recorded them.
    runsc_version: str = ""
    runsc_platform: str = ""

    def to_json(self) -> str:
        data = asdict(self)
        data["spec"] = spec_to_dict(self.spec)
        data["format"] = SNAPSHOT_FORMAT
        return json.dumps(data, indent=1)


def write_private(path: Path, text: str) -> None:
    """Atomic, durable write readable by root only (records hold the agent secret): a crash leaves
    the old record or the new one, never a truncated one (about 1 ms of fsync here)."""
    write_private_file(path, text.encode())


def _meta_json(snapshot_dir: Path) -> dict[str, Any]:
    """The snapshot's meta file as JSON; SnapshotError saying what is wrong with it."""
    try:
        data = json.loads((snapshot_dir / SNAPSHOT_FILE).read_text())
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {snapshot_dir} is incomplete: {SNAPSHOT_FILE} is missing") from None
    except (OSError, ValueError) as error:
        raise SnapshotError(
            f"snapshot {snapshot_dir} is corrupt: cannot read {SNAPSHOT_FILE}: {error}"
        ) from None
    if not isinstance(data, dict):
        raise SnapshotError(f"snapshot {snapshot_dir} is corrupt: {SNAPSHOT_FILE} is not an object")
    return data


def read_snapshot_meta(snapshot_dir: Path, driver: str) -> SnapshotMeta:
    if not snapshot_dir.is_dir():
        raise SnapshotError(f"snapshot {snapshot_dir} does not exist")
    data = _meta_json(snapshot_dir)
    if data.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(
            f"snapshot {snapshot_dir} has format {data.get('format')!r}, expected {SNAPSHOT_FORMAT}"
        )
    if data.get("driver") != driver:
        raise SnapshotError(
            f"snapshot {snapshot_dir} was made by the {data.get('driver')} driver and cannot be restored by {driver}"
        )
    try:
        meta = SnapshotMeta(
            driver=data["driver"],
            spec=spec_from_dict(data["spec"]),
            token=str(data["token"]),
            footprint_bytes=int(data["footprint_bytes"]),
            disk_bytes=int(data["disk_bytes"]),
            runsc_version=str(data.get("runsc_version") or ""),
            runsc_platform=str(data.get("runsc_platform") or ""),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise SnapshotError(f"snapshot {snapshot_dir} is corrupt: {SNAPSHOT_FILE} lacks {error}") from None
    if not meta.spec.rootfs.is_dir():
        raise SnapshotError(
            f"snapshot {snapshot_dir} needs the image root filesystem {meta.spec.rootfs}, which is gone"
        )
    return meta


def relocate_snapshot(snapshot_dir: Path, rootfs: Path) -> None:
    """Point a snapshot copied from elsewhere (another host's outputs, fetched from the object
    store) at the image root filesystem `rootfs`: its meta file names the path the snapshot was
    made with. Only spec.rootfs changes; the rewrite is atomic (write_private)."""
    data = _meta_json(snapshot_dir)
    if not isinstance(data.get("spec"), dict):
        raise SnapshotError(f"snapshot {snapshot_dir} is corrupt: {SNAPSHOT_FILE} has no spec")
    data["spec"]["rootfs"] = str(rootfs)
    write_private(snapshot_dir / SNAPSHOT_FILE, json.dumps(data, indent=1))


def prepare_snapshot_dir(snapshot_dir: Path) -> None:
    if snapshot_dir.exists() and any(snapshot_dir.iterdir()):
        raise SnapshotError(f"snapshot directory {snapshot_dir} is not empty")
    snapshot_dir.mkdir(parents=True, exist_ok=True)


def discard_snapshot_contents(snapshot_dir: Path) -> None:
    """Undo a failed snapshot: the directory was empty before we wrote to it."""
    for entry in snapshot_dir.iterdir() if snapshot_dir.is_dir() else []:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def record_of(sandbox: Sandbox) -> SandboxRecord:
    record = sandbox.extra.get("record")
    if not isinstance(record, SandboxRecord):
        raise DriverError(f"sandbox {sandbox.sandbox_id} handle has no record (not made by this driver)")
    return record


class BaseDriver(SandboxDriver):
    """Common parts of the gvisor and process drivers. Subclasses implement the runtime itself.

    Options (keyword arguments of make_driver):
      memory_reserve_mib     memory the host keeps for itself (see host.MemoryGate)
      start_timeout          seconds a sandbox may take to come up
      exit_grace             seconds start() watches a new app, to report one that exits at once
      suspend_to_disk_after  drivers that write memory to disk (gvisor): seconds a suspended
                             sandbox stays frozen in RAM first, so that a quick resume is instant
      restore_pool_size      gvisor: sandboxes kept restored ahead of time per hot snapshot
    """

    # What a freshly cold-started sandbox occupies before the app grows (admission estimate).
    cold_start_footprint_bytes = 64 * MIB

    def __init__(
        self,
        state_root: Path,
        cache_dir: Path,
        *,
        memory_reserve_mib: int | None = None,
        start_timeout: float = 60.0,
        exit_grace: float = 0.2,
        suspend_to_disk_after: float = 20.0,
        restore_pool_size: int = 1,
    ) -> None:
        layout = cgroups.detect()
        if layout is None:
            raise DriverError(
                "the cgroup controllers memory, cpu, cpuacct, pids and freezer are not available"
            )
        self.state_root = state_root
        self.cache_dir = cache_dir
        self.scope = names.scope_for(state_root, self.name)
        # Where systemd owns the cgroup v2 tree, ours is a delegated scope (made on first use).
        self.delegated = cgroup_scope.for_host(layout.mounts.get("unified", Path()), self.scope)
        self.layout = replace(layout, base=self.delegated.relative) if self.delegated else layout
        self.gate = MemoryGate(memory_reserve_mib)
        self.start_timeout = start_timeout
        self.exit_grace = exit_grace
        self.suspend_to_disk_after = suspend_to_disk_after
        self.restore_pool_size = restore_pool_size
        self._code_bytes: dict[Path, int] = {}
        self._locks: dict[tuple[int, str], asyncio.Lock] = {}
        self._creating: set[str] = set()  # ids start() / restore() of this driver are making now
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ hooks for subclasses

    def agent_address(self, sandbox: Sandbox) -> AgentAddress:
        raise NotImplementedError

    async def runtime_alive(self, sandbox: Sandbox) -> bool:
        """Is the sandbox's runtime (runsc, bwrap) still there?"""
        return bool(self.cgroup_of(sandbox).pids())

    async def teardown(self, sandbox: Sandbox, host: names.HostNames) -> None:
        """Stop the runtime and remove what only this driver creates; destroy() does the rest."""

    def namespaces(self, host: names.HostNames) -> list[str]:
        raise NotImplementedError

    async def remove_orphans(self, keep_keys: set[str]) -> None:
        """Remove runtime objects (containers, ...) of sandboxes that have no state dir."""

    # ------------------------------------------------------------------ state

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_root / "sandboxes"

    def state_dir(self, sandbox_id: str) -> Path:
        return self.sandboxes_dir / sandbox_id

    def names_of(self, sandbox: Sandbox) -> names.HostNames:
        return names.host_names(self.scope, record_of(sandbox).key)

    def cgroup_for(self, host: names.HostNames) -> cgroups.Cgroup:
        return cgroups.Cgroup(self.layout, host.cgroup)

    def cgroup_of(self, sandbox: Sandbox) -> cgroups.Cgroup:
        return self.cgroup_for(self.names_of(sandbox))

    async def create_cgroup(self, host: names.HostNames, limits: cgroups.Limits) -> cgroups.Cgroup:
        """The sandbox's cgroup with its limits, below the delegated scope (made if need be)."""
        return await self._create_cgroup(host.cgroup, limits)

    async def _create_cgroup(self, relative: str, limits: cgroups.Limits) -> cgroups.Cgroup:
        if self.delegated is not None and not self.delegated.exists():
            await asyncio.to_thread(self.delegated.ensure)
        cgroup = cgroups.Cgroup(self.layout, relative)
        cgroup.create(limits)
        return cgroup

    async def job_cgroup(self, name: str, memory_mib: int) -> cgroups.Cgroup:
        """See SandboxDriver.job_cgroup. Beside the sandboxes' cgroups: the startup sweep
        (cleanup_strays) removes one a crash left behind, and with it what still runs inside."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        limits = cgroups.Limits(memory_mib * MIB, float(os.cpu_count() or 1), JOB_PIDS_MAX)
        return await self._create_cgroup(f"{names.cgroup_parent(self.scope)}/{safe}", limits)

    def lock(self, sandbox_id: str) -> asyncio.Lock:
        """Serialises state changes of one sandbox (suspend, resume, the disk tier, destroy)."""
        key = (id(asyncio.get_running_loop()), sandbox_id)
        if key not in self._locks:
            self._locks[key] = asyncio.Lock()
        return self._locks[key]

    def refresh(self, sandbox: Sandbox) -> SandboxRecord:
        """The record as on disk: background work (the disk tier) may have changed it since this
        handle was made. Updates the handle's record object in place."""
        record = record_of(sandbox)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            stored = SandboxRecord.from_json((sandbox.state_dir / RECORD_FILE).read_text())
            record.__dict__.update(stored.__dict__)
        return record

    def save(self, sandbox: Sandbox) -> None:
        write_private(sandbox.state_dir / RECORD_FILE, record_of(sandbox).to_json())

    def load(self, sandbox_id: str) -> Sandbox | None:
        state_dir = self.state_dir(sandbox_id)
        try:
            record = SandboxRecord.from_json((state_dir / RECORD_FILE).read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return Sandbox(sandbox_id, self.name, state_dir, record.spec, {"record": record})

    @contextlib.contextmanager
    def creating(self, sandbox_id: str) -> Iterator[None]:
        """Around start() and restore(): adopt() leaves a sandbox being made alone."""
        self._creating.add(sandbox_id)
        try:
            yield
        finally:
            self._creating.discard(sandbox_id)

    async def drop_unfinished(self, sandbox: Sandbox) -> None:
        """adopt() of a sandbox whose start or restore a stopped server never finished (its record
        still says so): destroy what was made, so that the id can be started again. Called with the
        sandbox's lock held."""
        if sandbox.sandbox_id in self._creating:
            return
        log.info("removing sandbox %s: its start never finished", sandbox.sandbox_id)
        await self.destroy_quietly(sandbox)

    def new_sandbox(self, sandbox_id: str, spec: SandboxSpec, token: str, agent_binary: Path) -> Sandbox:
        """Claim the state directory; fails if the id is in use."""
        names.check_sandbox_id(sandbox_id)
        state_dir = self.state_dir(sandbox_id)
        try:
            state_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise DriverError(f"sandbox {sandbox_id} already exists") from None
        record = SandboxRecord(sandbox_id, self.name, spec, names.new_key(), token, str(agent_binary))
        sandbox = Sandbox(sandbox_id, self.name, state_dir, spec, {"record": record})
        self.save(sandbox)
        return sandbox

    @staticmethod
    def new_token() -> str:
        return secrets.token_hex(16)

    def check_spec(self, spec: SandboxSpec) -> rootfs.ResolvedUser:
        if spec.memory_mib < MIN_MEMORY_MIB:
            raise DriverError(f"memory_mib must be at least {MIN_MEMORY_MIB}, got {spec.memory_mib}")
        if spec.vcpus <= 0 or spec.pids_max < 8:
            raise DriverError(
                f"vcpus must be positive and pids_max at least 8 (got {spec.vcpus}, {spec.pids_max})"
            )
        rootfs.check_process(spec.rootfs, spec.process)
        return rootfs.resolve_user(spec.rootfs, spec.process.user)

    def cgroup_limits(self, spec: SandboxSpec, extra_pids: int = 0) -> cgroups.Limits:
        return cgroups.Limits(spec.memory_mib * MIB, spec.vcpus, spec.pids_max + extra_pids)

    async def code_bytes(self, root: Path) -> int:
        if root not in self._code_bytes:
            self._code_bytes[root] = await asyncio.to_thread(rootfs.tree_size, root)
        return self._code_bytes[root]

    # ------------------------------------------------------------------ the agent

    async def wait_ready(self, sandbox: Sandbox, *, grace: float = 0.0) -> None:
        """Wait until the agent answers; fail with the app's own words if it could not start."""
        address = self.agent_address(sandbox)
        deadline = time.monotonic() + self.start_timeout
        next_alive_check = time.monotonic() + 0.1
        delay = 0.002
        while True:
            try:
                status = await agent_client.control(address, "STATUS", timeout=5.0)
                break
            except agent_client.AgentError:
                raise
            except (OSError, TimeoutError, DriverError):
                pass
            now = time.monotonic()
            if now > deadline:
                raise DriverError(
                    f"sandbox {sandbox.sandbox_id} did not come up within {self.start_timeout:g} s; "
                    f"log: {proc.tail(self.log_path(sandbox)) or '(empty)'}"
                )
            if now > next_alive_check:
                next_alive_check = now + 0.1
                if not await self.runtime_alive(sandbox):
                    raise DriverError(
                        f"sandbox {sandbox.sandbox_id} stopped while starting: {self.stopped_detail(sandbox)}"
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        self.raise_if_app_down(sandbox, status)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            await asyncio.sleep(0.05)
            self.raise_if_app_down(sandbox, await agent_client.control(address, "STATUS"))

    def raise_if_app_down(self, sandbox: Sandbox, status: dict[str, str]) -> None:
        state = status.get("app")
        if state == "running":
            return
        raise DriverError(self.describe_app(sandbox, state or "?", int(status.get("status", "-1"))))

    def describe_app(self, sandbox: Sandbox, state: str, status: int, oom: bool | None = None) -> str:
        """Words for an app that is not running. oom: whether the memory limit struck, when the
        caller has already read it."""
        output = proc.tail(self.log_path(sandbox), 1500) or "(no output)"
        if state == "failed":
            return f"the app could not be started ({os.strerror(status)}); log: {output}"
        how = f"status {status}"
        if status > 128:
            how += f" (killed by signal {status - 128})"
        return f"the app exited with {how}{self._memory_limit_words(sandbox, oom)}; last output: {output}"

    def _memory_limit_words(self, sandbox: Sandbox, oom: bool | None) -> str:
        if oom is None:
            oom = self.cgroup_of(sandbox).oom_kills() > 0
        return f" (it was killed at its memory limit of {sandbox.spec.memory_mib} MiB)" if oom else ""

    def stopped_detail(self, sandbox: Sandbox, oom: bool | None = None) -> str:
        words = "the sandbox is not running" + self._memory_limit_words(sandbox, oom)
        output = proc.tail(self.log_path(sandbox), 1500)
        return words + (f"; log: {output}" if output else "")

    def is_suspended(self, sandbox: Sandbox) -> bool:
        # "suspending" too: a suspended sandbox whose memory is being written to disk in the
        # background (gvisor's disk tier) is still suspended to its callers, who must resume() it.
        return record_of(sandbox).state in ("suspended", "suspending")

    def require_running(self, sandbox: Sandbox) -> SandboxRecord:
        record = record_of(sandbox)
        if record.state == "suspended":
            raise DriverError(f"sandbox {sandbox.sandbox_id} is suspended; resume it first")
        if record.state in ("suspending", "resuming"):
            raise DriverError(f"sandbox {sandbox.sandbox_id} is {record.state}; try again when it is done")
        return record

    def _ended(
        self, sandbox: Sandbox, state: str, code: int | None = None, oom: bool | None = None
    ) -> AppStatus:
        """The final AppStatus of an app that stopped ("exited", "failed") or of a sandbox that did
        ("stopped"), its memory-limit kills read once (unless the caller has: oom)."""
        if oom is None:
            oom = self.cgroup_of(sandbox).oom_kills() > 0
        if state == "stopped":
            return AppStatus(state, None, oom, self.stopped_detail(sandbox, oom))
        assert code is not None
        return AppStatus(state, code, oom, self.describe_app(sandbox, state, code, oom))

    async def app_status(self, sandbox: Sandbox) -> AppStatus:
        record = record_of(sandbox)
        if record.state in ("suspended", "suspending", "resuming"):
            return AppStatus("suspended")
        oom = self.cgroup_of(sandbox).oom_kills() > 0
        # A dead gVisor sandbox does not even refuse connections; ask the host first.
        if not await self.runtime_alive(sandbox):
            return self._ended(sandbox, "stopped", oom=oom)
        try:
            status = await agent_client.control(self.agent_address(sandbox), "STATUS", timeout=5.0)
        except (OSError, TimeoutError, DriverError):
            return self._ended(sandbox, "stopped", oom=oom)
        state = status.get("app", "?")
        code = int(status.get("status", "-1"))
        if state == "running":
            return AppStatus("running", None, oom)
        return self._ended(sandbox, state, code, oom)

    def _watchable(self, sandbox: Sandbox) -> bool:
        """Meant to be running, and nothing (suspend, resume, destroy) under way."""
        return not self.lock(sandbox.sandbox_id).locked() and self.refresh(sandbox).state == "running"

    async def wait_exit(self, sandbox: Sandbox, interval: float = 2.0) -> AppStatus:
        """See SandboxDriver.wait_exit. A dead sandbox: its cgroup is empty (read every interval;
        under gVisor the whole sandbox goes when it is killed). An exited app: the agent answers a
        WAIT request kept open; an agent too old for WAIT is asked STATUS every 5 intervals. The
        WAIT connection is dropped (an ABORT resets it) while the sandbox is suspended."""
        watch: agent_client.AppWatch | None = None
        wait_known = True  # False once an old agent has turned WAIT down
        rounds = 0
        try:
            while True:
                if not sandbox.state_dir.exists():
                    return AppStatus("stopped", None, False, "the sandbox was destroyed")
                quiet = self._watchable(sandbox)
                if quiet and not await self.runtime_alive(sandbox) and self._watchable(sandbox):
                    return self._ended(sandbox, "stopped")
                if not quiet and watch is not None:
                    await watch.close()
                    watch = None
                if quiet and watch is None and wait_known:
                    with contextlib.suppress(OSError, TimeoutError, DriverError):
                        watch = await agent_client.watch_app(self.agent_address(sandbox))
                if quiet and not wait_known and rounds % 5 == 0:
                    # Only the app's own end counts here: an agent slow to answer is no dead sandbox.
                    status = await self.app_status(sandbox)
                    if status.state in ("exited", "failed") and self._watchable(sandbox):
                        return status
                rounds += 1
                if watch is None:
                    await asyncio.sleep(interval)
                    continue
                done, _ = await asyncio.wait({watch.answer}, timeout=interval)
                if not done:
                    continue
                fields: dict[str, str] | None = None
                try:
                    fields = watch.answer.result()
                except agent_client.AgentError as error:
                    wait_known = error.code != agent_client.ERR_PROTOCOL
                except (OSError, ValueError, DriverError):
                    pass  # an ABORT (a suspend), a dead sandbox, a garbled answer: look again
                await watch.close()
                watch = None
                if fields is None or fields.get("app", "running") == "running":
                    continue
                if not self._watchable(sandbox):
                    continue  # the exit stays; it is reported once the sandbox runs again
                try:
                    code = int(fields.get("status", "-1"))
                except ValueError:
                    code = -1
                return self._ended(sandbox, fields["app"], code)
        finally:
            if watch is not None:
                await watch.close()

    async def exec_pty(
        self,
        sandbox: Sandbox,
        argv: list[str],
        env: dict[str, str] | None = None,
        rows: int = 24,
        cols: int = 80,
    ) -> PtySession:
        self.require_running(sandbox)
        full_env = {"PATH": rootfs.DEFAULT_PATH, "TERM": "xterm-256color", "HOME": "/root"}
        full_env.update(env or {})
        try:
            return await agent_client.open_pty(self.agent_address(sandbox), argv, full_env, rows, cols)
        except (OSError, TimeoutError) as error:
            raise DriverError(f"cannot open a terminal in sandbox {sandbox.sandbox_id}: {error}") from None

    async def stats(self, sandbox: Sandbox) -> SandboxStats:
        cgroup = self.cgroup_of(sandbox)
        return SandboxStats(rss_bytes=cgroup.memory_bytes(), cpu_seconds=cgroup.cpu_seconds())

    # ------------------------------------------------------------------ teardown and recovery

    async def destroy(self, sandbox: Sandbox) -> None:
        async with self.lock(sandbox.sandbox_id):
            await self._destroy_locked(sandbox)

    async def _destroy_locked(self, sandbox: Sandbox) -> None:
        problems: list[str] = []
        host = names.host_names(self.scope, record_of(sandbox).key) if "record" in sandbox.extra else None
        if host is not None:
            try:
                await self.teardown(sandbox, host)
            except (DriverError, OSError) as error:
                problems.append(str(error))
            try:
                await self.cgroup_for(host).remove()
                # The per-server parent goes with its last sandbox (it is made again on demand).
                cgroups.remove_parent_if_empty(self.layout, names.cgroup_parent(self.scope))
            except (DriverError, OSError) as error:
                problems.append(str(error))
            for name in self.namespaces(host):
                try:
                    await netns.delete(name)
                except (DriverError, OSError) as error:
                    problems.append(str(error))
        await asyncio.to_thread(shutil.rmtree, sandbox.state_dir, True)
        if sandbox.state_dir.exists():
            problems.append(f"cannot remove {sandbox.state_dir}")
        if problems:
            raise DriverError(
                f"destroying sandbox {sandbox.sandbox_id} left something behind: " + "; ".join(problems)
            )

    async def destroy_quietly(self, sandbox: Sandbox) -> None:
        """Cleanup on a failure path: the original error matters more than a cleanup error."""
        try:
            await self._destroy_locked(sandbox)
        except Exception:
            log.exception("cleanup of sandbox %s failed", sandbox.sandbox_id)

    async def cleanup_strays(self, keep: set[str]) -> list[str]:
        removed: list[str] = []
        keep_keys: set[str] = set()
        for state_dir in sorted(self.sandboxes_dir.iterdir()) if self.sandboxes_dir.is_dir() else []:
            sandbox_id = state_dir.name
            sandbox = self.load(sandbox_id)
            if sandbox_id in keep:
                if sandbox is not None:
                    keep_keys.add(record_of(sandbox).key)
                continue
            log.info("removing stray sandbox %s", sandbox_id)
            if sandbox is None:  # no readable record: its host objects are found by name below
                sandbox = Sandbox(
                    sandbox_id, self.name, state_dir, SandboxSpec(Path("/"), ProcessConfig(argv=[])), {}
                )
            await self.destroy(sandbox)
            removed.append(sandbox_id)
        # Host objects without a state dir (a crash between creating them and writing it).
        for name in netns.list_names(names.netns_prefix(self.scope)):
            if names.key_of_netns(self.scope, name) not in keep_keys:
                log.info("removing stray network namespace %s", name)
                await netns.delete(name)
        parent = names.cgroup_parent(self.scope)
        # Every mounted hierarchy: runsc also makes the sandbox's cgroup in blkio, cpuset, devices,
        # name=systemd, ..., and after a crash nothing else removes it there.
        for key in cgroups.children_everywhere(self.layout, parent):
            if key not in keep_keys:
                log.info("removing stray cgroup %s/%s", parent, key)
                await cgroups.Cgroup(self.layout, f"{parent}/{key}").remove()
        await self.remove_orphans(keep_keys)
        if not keep_keys:
            cgroups.remove_parent_if_empty(self.layout, parent)
            await self.release_scope()
        return removed

    async def close(self) -> None:
        await self.release_scope()

    async def release_scope(self) -> None:
        """End the delegated scope when it holds no sandbox any more (the keeper goes too)."""
        if self.delegated is not None and not cgroups.children(self.layout, names.cgroup_parent(self.scope)):
            await asyncio.to_thread(self.delegated.release)
