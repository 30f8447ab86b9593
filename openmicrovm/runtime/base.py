"""What both drivers share: state directories (records.py says what is in them), admission, the
agent, teardown and recovery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Generic

from ..concurrency import gather_at_most
from . import agent_build, agent_client, cgroup_scope, cgroups, names, netns, rootfs
from .agent_client import AgentAddress
from .app_monitor import AppMonitor
from .driver import (
    AppStatus,
    DriverError,
    ProcessConfig,
    PtySession,
    Sandbox,
    SandboxDriver,
    SandboxSpec,
    SandboxStats,
    Strays,
)
from .host import MIB, MemoryGate, common_problems
from .options import DriverOptions
from .records import RECORD_FILE, RecordT, record_of, write_private

log = logging.getLogger("openmicrovm.runtime")

MIN_MEMORY_MIB = 64
# Processes a job cgroup (a Dockerfile build: buildah, its RUN steps) may hold: room for parallel
# compilers and package managers, not for a fork bomb.
JOB_PIDS_MAX = 4096
# Stray sandboxes removed in parallel (a restart or `openmicrovm cleanup` after a crash may find
# hundreds): each removal mostly waits on runsc, ip and the kernel, so a few at once on any host.
STRAYS_REMOVED_AT_ONCE = 8


class BaseDriver(SandboxDriver, Generic[RecordT]):
    """Common parts of the gvisor and process drivers. Subclasses implement the runtime itself,
    and name the record type they keep (record_type) and the options they take (options_type)."""

    # What a freshly cold-started sandbox occupies before the app grows (admission estimate).
    cold_start_footprint_bytes = 64 * MIB
    record_type: type[RecordT]
    options_type: type[DriverOptions] = DriverOptions
    # What an operator loses with this driver, said when "auto" falls back to it (registry.py).
    fallback_limits = ""

    @classmethod
    def host_problems(cls, options: DriverOptions, cache_dir: Path | None) -> list[str]:
        """Why this driver cannot run here with these options (empty when it can)."""
        return common_problems()

    def __init__(self, state_root: Path, cache_dir: Path, options: DriverOptions | None = None) -> None:
        options = options or self.options_type()
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
        self.gate = MemoryGate(options.memory_reserve_mib)
        self.start_timeout = options.start_timeout
        self.exit_grace = options.exit_grace
        self.apps = AppMonitor(self)
        self._code_bytes: dict[Path, int] = {}
        self._locks: dict[tuple[int, str], asyncio.Lock] = {}
        self._creating: set[str] = set()  # ids start() / restore() of this driver are making now
        # The strays last noted (find_strays) until remove_strays has removed them; unless_stray.
        self._strays = Strays()
        self._strays_removed = asyncio.Event()
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ hooks for subclasses

    async def boot(self, sandbox: Sandbox, agent: Path) -> None:
        """Bring a new sandbox (start()) up from its record: make what it needs on the host, start
        the agent and the app, wait until they answer. start() destroys it all on a failure."""
        raise NotImplementedError

    def agent_address(self, sandbox: Sandbox) -> AgentAddress:
        raise NotImplementedError

    async def runtime_alive(self, sandbox: Sandbox) -> bool:
        """Is the sandbox's runtime (runsc, bwrap) still there?"""
        return bool(self.cgroup_of(sandbox).pids())

    async def teardown(self, sandbox: Sandbox, host: names.HostNames) -> None:
        """Stop the runtime and remove what only this driver creates; destroy() does the rest."""

    def namespaces(self, host: names.HostNames) -> list[str]:
        raise NotImplementedError

    def runtime_keys(self) -> set[str]:
        """The keys of the runtime's own objects on the host (runsc containers, ...)."""
        return set()

    async def remove_orphans(self, stray_keys: set[str]) -> None:
        """Remove runtime objects (containers, uplinks, ...) of these stray keys."""

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

    def record(self, sandbox: Sandbox) -> RecordT:
        """The handle's record, of this driver's type."""
        record = sandbox.extra.get("record")
        if not isinstance(record, self.record_type):
            raise DriverError(f"sandbox {sandbox.sandbox_id} handle has no record (not made by this driver)")
        return record

    def refresh(self, sandbox: Sandbox) -> RecordT:
        """The record as on disk: background work (the disk tier) may have changed it since this
        handle was made. Updates the handle's record object in place."""
        record = self.record(sandbox)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            stored = self.record_type.from_json((sandbox.state_dir / RECORD_FILE).read_text())
            record.__dict__.update(stored.__dict__)
        return record

    def save(self, sandbox: Sandbox) -> None:
        write_private(sandbox.state_dir / RECORD_FILE, record_of(sandbox).to_json(), durable=False)

    def load(self, sandbox_id: str) -> Sandbox | None:
        state_dir = self.state_dir(sandbox_id)
        try:
            record = self.record_type.from_json((state_dir / RECORD_FILE).read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return Sandbox(sandbox_id, self.name, state_dir, record.spec, {"record": record})

    @contextlib.asynccontextmanager
    async def destroyed_on_failure(self, sandbox: Sandbox) -> AsyncIterator[Sandbox]:
        """Around making a sandbox: whatever of it exists when the block fails goes again (destroy
        knows every host object by the record's names, so it is the whole undo)."""
        try:
            yield sandbox
        except BaseException:
            await self.destroy_quietly(sandbox)
            raise

    async def unless_stray(self, sandbox_id: str) -> None:
        """Before a sandbox is made under this id: wait while a stray of that id is being removed
        (a restart removes strays while the server serves; a build or a start a crash
        interrupted is begun again under the same id)."""
        while sandbox_id in self._strays.ids:
            await self._strays_removed.wait()  # set when removed, or when strays are noted anew

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

    async def start(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        await self.unless_stray(sandbox_id)
        with self.creating(sandbox_id):
            self.check_spec(spec)
            self.gate.check("start a sandbox", self.cold_start_footprint_bytes, spec.memory_mib)
            agent = await agent_build.ensure_agent(self.cache_dir)
            sandbox = self.new_sandbox(sandbox_id, spec, self.new_token(), agent)
            async with self.destroyed_on_failure(sandbox):
                await self.boot(sandbox, agent)
                self.record(sandbox).state = "running"
                self.save(sandbox)
            log.info("%s sandbox %s started", self.name, sandbox_id)
            return sandbox

    def new_sandbox(self, sandbox_id: str, spec: SandboxSpec, token: str, agent_binary: Path) -> Sandbox:
        """Claim the state directory; fails if the id is in use."""
        names.check_sandbox_id(sandbox_id)
        state_dir = self.state_dir(sandbox_id)
        try:
            state_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise DriverError(f"sandbox {sandbox_id} already exists") from None
        record = self.record_type(sandbox_id, self.name, spec, names.new_key(), token, str(agent_binary))
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

    # ------------------------------------------------------------------ the app (app_monitor.py)

    async def wait_ready(self, sandbox: Sandbox, *, grace: float = 0.0) -> None:
        await self.apps.wait_ready(sandbox, grace=grace)

    def raise_if_app_down(self, sandbox: Sandbox, status: dict[str, str]) -> None:
        self.apps.raise_if_app_down(sandbox, status)

    def stopped_detail(self, sandbox: Sandbox) -> str:
        return self.apps.stopped_detail(sandbox)

    async def app_status(self, sandbox: Sandbox) -> AppStatus:
        return await self.apps.app_status(sandbox)

    async def wait_exit(self, sandbox: Sandbox, interval: float = 2.0) -> AppStatus:
        return await self.apps.wait_exit(sandbox, interval)

    def is_suspended(self, sandbox: Sandbox) -> bool:
        # "suspending" too: a suspended sandbox whose memory is being written to disk in the
        # background (gvisor's disk tier) is still suspended to its callers, who must resume() it.
        return record_of(sandbox).state in ("suspended", "suspending")

    def require_running(self, sandbox: Sandbox) -> RecordT:
        record = self.record(sandbox)
        if record.state == "suspended":
            raise DriverError(f"sandbox {sandbox.sandbox_id} is suspended; resume it first")
        if record.state in ("suspending", "resuming"):
            raise DriverError(f"sandbox {sandbox.sandbox_id} is {record.state}; try again when it is done")
        return record

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
                await asyncio.to_thread(
                    cgroups.remove_parent_if_empty, self.layout, names.cgroup_parent(self.scope)
                )
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
        removed = await self.remove_strays(await self.find_strays(keep))
        if not keep:
            cgroups.remove_parent_if_empty(self.layout, names.cgroup_parent(self.scope))
            await self.release_scope()
        return removed

    async def find_strays(self, keep: set[str]) -> Strays:
        strays = await asyncio.to_thread(self._find_strays, keep)
        self._strays_removed.set()  # whoever waits looks again, at these
        self._strays, self._strays_removed = strays, asyncio.Event()
        return strays

    def _find_strays(self, keep: set[str]) -> Strays:
        sandboxes: list[Sandbox] = []
        keep_keys: set[str] = set()
        found_keys: set[str] = set()
        for state_dir in sorted(self.sandboxes_dir.iterdir()) if self.sandboxes_dir.is_dir() else []:
            sandbox_id = state_dir.name
            sandbox = self.load(sandbox_id)
            if sandbox_id in keep:
                if sandbox is not None:
                    keep_keys.add(record_of(sandbox).key)
                continue
            if sandbox is None:  # no readable record: its host objects are found by name below
                sandbox = Sandbox(
                    sandbox_id, self.name, state_dir, SandboxSpec(Path("/"), ProcessConfig(argv=[])), {}
                )
            else:
                found_keys.add(record_of(sandbox).key)
            sandboxes.append(sandbox)
        # Host objects without a state dir (a crash between creating them and writing it).
        found_keys.update(
            key
            for name in netns.list_names(names.netns_prefix(self.scope))
            if (key := names.key_of_netns(self.scope, name)) is not None
        )
        # Every mounted hierarchy: runsc also makes the sandbox's cgroup in blkio, cpuset, devices,
        # name=systemd, ..., and after a crash nothing else removes it there.
        found_keys.update(cgroups.children_everywhere(self.layout, names.cgroup_parent(self.scope)))
        found_keys.update(self.runtime_keys())
        return Strays(tuple(sandboxes), frozenset(found_keys - keep_keys))

    async def remove_strays(self, strays: Strays) -> list[str]:
        try:
            await self._remove_strays(strays)
        finally:
            if strays is self._strays:
                self._strays_removed.set()
                self._strays = Strays()
        return strays.ids

    async def _remove_strays(self, strays: Strays) -> None:
        await self._destroy_all(list(strays.sandboxes))
        for name in netns.list_names(names.netns_prefix(self.scope)):
            if names.key_of_netns(self.scope, name) in strays.keys:
                log.info("removing stray network namespace %s", name)
                await netns.delete(name)
        parent = names.cgroup_parent(self.scope)
        for key in cgroups.children_everywhere(self.layout, parent):
            if key in strays.keys:
                log.info("removing stray cgroup %s/%s", parent, key)
                await cgroups.Cgroup(self.layout, f"{parent}/{key}").remove()
        await self.remove_orphans(set(strays.keys))

    async def _destroy_all(self, strays: list[Sandbox]) -> None:
        """Destroy these sandboxes, a few at a time (each mostly waits on runsc, ip and the
        kernel); every one is tried, and the first failure is raised once all are done."""

        async def destroy(sandbox: Sandbox) -> None:
            log.info("removing stray sandbox %s", sandbox.sandbox_id)
            await self.destroy(sandbox)

        await gather_at_most(STRAYS_REMOVED_AT_ONCE, (destroy(sandbox) for sandbox in strays))

    async def close(self) -> None:
        await self.release_scope()

    async def release_scope(self) -> None:
        """End the delegated scope when it holds no sandbox any more (the keeper goes too)."""
        if self.delegated is not None and not cgroups.children(self.layout, names.cgroup_parent(self.scope)):
            await asyncio.to_thread(self.delegated.release)
