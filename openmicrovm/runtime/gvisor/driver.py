"""The gvisor driver: every sandbox is a runsc (gVisor) sandbox.

Which runsc: see runtime/runsc.py. New sandboxes run under the newest runsc that works here
(Debian 13's 0.0~20240729 from runsc_install.py, else Debian 12's 0.0~20221219), on the ptrace
platform unless told to use systrap (runsc.py says why), and every sandbox and snapshot keeps the
runsc it was made with (runsc_commands.py).

This class composes the mechanisms, one module each:
    runsc_commands  every runsc command, and which binary runs it
    launcher        the shell around runsc: private mounts, the sandbox's root, markers
    bundle          the OCI bundle: the guest agent as init
    network         the sandbox's namespaces, its agent's address, egress uplinks
    checkpoint      runsc checkpoint, snapshots, the markers of finished commands
    pool, warm      sandboxes restored ahead of time from hot snapshots
    suspend         freeze now, memory to disk later, and back
    recovery        after a crash: adopt what is left, remove what is stray
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
from pathlib import Path

from .. import agent_build, agent_client, names, netns, proc
from .. import runsc as runsc_binaries
from ..agent_client import AgentAddress
from ..base import BaseDriver
from ..driver import (
    DriverCapabilities,
    DriverError,
    PortNotListening,
    Sandbox,
    SnapshotError,
    SnapshotInfo,
)
from ..host import MIB
from ..options import DriverOptions
from ..records import SNAPSHOT_FILE, discard_snapshot_contents, prepare_snapshot_dir, write_private
from ..runsc import Runsc, RunscError
from . import bundle, network
from .checkpoint import MEMORY_IMAGE, SNAPSHOT_AGENT, Marker, checkpoint, read_snapshot
from .launcher import SandboxRoot
from .options import GVisorOptions
from .records import GVisorRecord, GVisorSnapshotMeta
from .recovery import Recovery
from .runsc_commands import Binary, RunscCommands
from .suspend import SuspendTiers
from .warm import WarmSandboxes

log = logging.getLogger("openmicrovm.runtime")

# Host tasks a sandbox may have beyond the spec's pids_max: gVisor's own threads (sentry, gofer)
# and the ptrace platform's stubs, one host process per guest address space with a host thread per
# sentry thread that ran it, all count against the sandbox's pids cgroup, and gVisor dies when it
# cannot create a thread. Measured (2-core machine, runsc 20240729, ptrace): 55-130 host tasks for
# an idle sandbox, ~90 while 128 connections are relayed to a threaded app; a fork bomb reaches
# ~14 host threads per guest process and meets the memory limit at ~1200 host tasks.
PIDS_HEADROOM = 512


class GVisorDriver(BaseDriver[GVisorRecord]):
    name = "gvisor"
    capabilities = DriverCapabilities(
        memory_snapshot=True, suspend_releases_memory=True, internet_egress=True
    )
    cold_start_footprint_bytes = 96 * MIB
    record_type = GVisorRecord
    options_type = GVisorOptions

    @classmethod
    def host_problems(cls, options: DriverOptions, cache_dir: Path | None) -> list[str]:
        problems = super().host_problems(options, cache_dir)
        explicit = options.runsc if isinstance(options, GVisorOptions) else None
        cache_dirs = [cache_dir] if cache_dir else None
        try:
            runsc_binaries.choose(explicit, cache_dirs)
        except RunscError as error:
            installed = runsc_binaries.system_binary() or runsc_binaries.installed(cache_dirs)
            problems.append(
                f"a usable runsc ({error})" if installed or explicit else "runsc (apt-get install runsc)"
            )
        return problems

    def __init__(self, state_root: Path, cache_dir: Path, options: DriverOptions | None = None) -> None:
        own = options if isinstance(options, GVisorOptions) else GVisorOptions.extending(options)
        self.uplinks = network.Uplinks(own.egress)
        super().__init__(state_root, cache_dir, own)
        self.suspend_to_disk_after = own.suspend_to_disk_after
        try:
            chosen = runsc_binaries.choose(own.runsc, [cache_dir])
            default = Binary(chosen, runsc_binaries.choose_platform(chosen, own.runsc_platform))
        except RunscError as error:
            raise DriverError(str(error)) from None
        log.info("gvisor driver: %s, %s platform", chosen.describe(), default.platform)
        self.commands = RunscCommands(state_root / "runsc", default, cache_dir)
        self.root = SandboxRoot(state_root, cache_dir)
        self.tiers = SuspendTiers(self)
        self.recovery = Recovery(self)
        self.warm = WarmSandboxes(self, own.restore_pool_size)

    @property
    def runsc(self) -> Runsc:
        """The runsc new sandboxes run under."""
        return self.commands.default.runsc

    @property
    def platform(self) -> str:
        """Its platform."""
        return self.commands.default.platform

    # ------------------------------------------------------------------ pieces

    def binary_of(self, sandbox: Sandbox) -> Binary:
        """The runsc a sandbox runs under, and its platform."""
        return self.commands.of_record(sandbox.sandbox_id, self.record(sandbox))

    def _set_binary(self, sandbox: Sandbox, binary: Binary) -> None:
        record = self.record(sandbox)
        record.runsc, record.runsc_platform = binary.runsc.path, binary.platform
        self.save(sandbox)

    def namespaces(self, host: names.HostNames) -> list[str]:
        return network.namespaces(host)

    def agent_address(self, sandbox: Sandbox) -> AgentAddress:
        return network.agent_address(self.names_of(sandbox), self.record(sandbox).token)

    async def _create_host_side(self, sandbox: Sandbox) -> None:
        host = self.names_of(sandbox)
        await self.create_cgroup(host, self.cgroup_limits(sandbox.spec, PIDS_HEADROOM))
        await network.create(host)

    def _write_bundle(self, sandbox: Sandbox, agent_binary: Path) -> Path:
        return bundle.write(
            sandbox.state_dir / "bundle",
            sandbox.spec,
            self.record(sandbox).token,
            agent_binary,
            root=self.root.mount_point,
            netns_path=netns.path_of(self.names_of(sandbox).netns),
            cgroups_path=self.cgroup_of(sandbox).path,
        )

    async def launch(self, sandbox: Sandbox, args: list[str], done: Marker | None = None) -> proc.Completed:
        """run / restore: the sandbox inherits the launcher's stdio, which is the app log, and the
        shim becomes the parent of the sandbox processes runsc leaves behind."""
        return await self.commands.run(
            args,
            binary=self.binary_of(sandbox),
            in_launcher=True,
            root=await self.root.options(sandbox.spec),
            log_file=self.log_path(sandbox),
            shim=await agent_build.shim_prefix(
                self.cache_dir, self.cgroup_of(sandbox).procs_files(), wait=True
            ),
            done=done.path if done is not None else None,
        )

    async def stop_container(self, sandbox: Sandbox) -> None:
        """Stop the sandbox's runsc container (its state dir and host objects stay)."""
        # Killing through the cgroup first makes `runsc delete` quick: it finds nothing to wait for.
        try:
            await self.cgroup_of(sandbox).kill_all()
        except DriverError:
            log.exception("stopping sandbox %s", sandbox.sandbox_id)
        container = self.names_of(sandbox).container
        if container in self.commands.containers():
            binary = self.commands.for_teardown(sandbox.sandbox_id, self.record(sandbox))
            await self.commands.run(["delete", "-force", container], binary=binary, timeout=60)

    # ------------------------------------------------------------------ start, connect

    async def boot(self, sandbox: Sandbox, agent: Path) -> None:
        self._set_binary(sandbox, self.commands.default)
        await self._create_host_side(sandbox)
        bundle_dir = self._write_bundle(sandbox, agent)
        container = self.names_of(sandbox).container
        result = await self.launch(sandbox, ["run", "--detach", "--bundle", str(bundle_dir), container])
        if result.returncode != 0:
            raise DriverError(f"runsc could not start the sandbox: {proc.tail(self.log_path(sandbox))}")
        await self.wait_ready(sandbox, grace=self.exit_grace)

    async def connect(self, sandbox: Sandbox, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.require_running(sandbox)
        try:
            return await agent_client.open_port(self.agent_address(sandbox), port)
        except PortNotListening as error:
            status = await self.app_status(sandbox)
            if status.state != "running":
                raise PortNotListening(f"{error}: {status.detail}") from None
            raise
        except (OSError, TimeoutError):
            raise DriverError(
                f"cannot reach sandbox {sandbox.sandbox_id}: {self.stopped_detail(sandbox)}"
            ) from None

    # ------------------------------------------------------------------ snapshots

    async def snapshot(self, sandbox: Sandbox, snapshot_dir: Path) -> SnapshotInfo:
        async with self.lock(sandbox.sandbox_id):
            self.refresh(sandbox)
            record = self.require_running(sandbox)
            prepare_snapshot_dir(snapshot_dir)
            try:
                status = await agent_client.control(self.agent_address(sandbox), "STATUS")
                self.raise_if_app_down(sandbox, status)
                disk_bytes = int(status.get("disk", "0"))
                footprint = self.cgroup_of(sandbox).memory_bytes()
                # The snapshot keeps its own copy of the agent: its processes were started from
                # that file, and a later agent build must not change what a restore maps.
                await asyncio.to_thread(shutil.copy2, record.agent_binary, snapshot_dir / SNAPSHOT_AGENT)
                image = snapshot_dir / MEMORY_IMAGE
                image.mkdir()
                binary = self.binary_of(sandbox)
                container = self.names_of(sandbox).container
                result = await checkpoint(
                    self.commands, binary, container, self.agent_address(sandbox), image
                )
                if result.returncode != 0:
                    raise SnapshotError(
                        f"runsc could not checkpoint sandbox {sandbox.sandbox_id}: {result.describe()}"
                    )
                meta = GVisorSnapshotMeta(
                    self.name,
                    sandbox.spec,
                    record.token,
                    footprint,
                    disk_bytes,
                    runsc_version=binary.runsc.version,
                    runsc_platform=binary.platform,
                )
                # Written last: a snapshot without it is incomplete.
                write_private(snapshot_dir / SNAPSHOT_FILE, meta.to_json())
            except BaseException:
                discard_snapshot_contents(snapshot_dir)
                raise
            await self._destroy_locked(sandbox)
        memory_bytes = sum(path.stat().st_size for path in (snapshot_dir / MEMORY_IMAGE).iterdir())
        return SnapshotInfo(
            snapshot_dir, memory_bytes, disk_bytes, await self.code_bytes(sandbox.spec.rootfs)
        )

    async def restore(self, sandbox_id: str, snapshot_dir: Path, *, egress: bool = False) -> Sandbox:
        names.check_sandbox_id(sandbox_id)
        meta = read_snapshot(snapshot_dir, self.name)
        self.commands.for_snapshot(snapshot_dir, meta)  # fails early when no runsc can restore it
        await self.unless_stray(sandbox_id)
        if self.state_dir(sandbox_id).exists():
            raise DriverError(f"sandbox {sandbox_id} already exists")
        with self.creating(sandbox_id):
            sandbox = await self.warm.pool.take(snapshot_dir, sandbox_id, egress)
            if sandbox is None:
                self.gate.check("restore a sandbox", meta.footprint_bytes, meta.spec.memory_mib)
                sandbox = await self.restore_new(sandbox_id, snapshot_dir, meta, egress, uplink=egress)
        self.warm.pool.restored(snapshot_dir)
        return sandbox

    async def restore_new(
        self, sandbox_id: str, snapshot_dir: Path, meta: GVisorSnapshotMeta, egress: bool, *, uplink: bool
    ) -> Sandbox:
        """A sandbox restored by runsc. uplink: give it an uplink (switched on when egress), made
        while runsc restores so that it costs the restore no time."""
        agent = snapshot_dir / SNAPSHOT_AGENT
        binary = self.commands.for_snapshot(snapshot_dir, meta)
        spec = dataclasses.replace(meta.spec, egress=egress)
        sandbox = self.new_sandbox(sandbox_id, spec, meta.token, agent)
        wiring: asyncio.Task[None] | None = None
        async with self.destroyed_on_failure(sandbox):
            try:
                self._set_binary(sandbox, binary)
                await self._create_host_side(sandbox)
                if uplink:
                    wiring = asyncio.create_task(
                        self.uplinks.attach(
                            self.names_of(sandbox),
                            self.record(sandbox),
                            lambda: self.save(sandbox),
                            enabled=egress,
                        )
                    )
                bundle_dir = self._write_bundle(sandbox, agent)
                image = snapshot_dir / MEMORY_IMAGE
                container = self.names_of(sandbox).container
                args = [
                    "restore",
                    "--detach",
                    "--image-path",
                    str(image),
                    "--bundle",
                    str(bundle_dir),
                    container,
                ]
                result = await self.launch(sandbox, args)
                if result.returncode != 0:
                    raise SnapshotError(
                        f"cannot restore from snapshot {snapshot_dir} with {binary.runsc.describe()} "
                        f"(corrupt?): {proc.tail(self.log_path(sandbox), 1500)}"
                    )
                await self.wait_ready(sandbox)
                if wiring is not None:
                    await wiring
            except BaseException:
                if wiring is not None:
                    wiring.cancel()
                    await asyncio.gather(wiring, return_exceptions=True)
                raise
            self.record(sandbox).state = "running"
            self.save(sandbox)
        return sandbox

    # ------------------------------------------------------------------ suspend, resume, recovery

    async def suspend(self, sandbox: Sandbox) -> None:
        await self.tiers.suspend(sandbox)

    async def resume(self, sandbox: Sandbox) -> None:
        await self.tiers.resume(sandbox)

    async def adopt(self, sandbox_id: str) -> Sandbox | None:
        return await self.recovery.adopt(sandbox_id)

    def runtime_keys(self) -> set[str]:
        return {key for container in self.commands.containers() if (key := names.key_of_container(container))}

    async def remove_orphans(self, stray_keys: set[str]) -> None:
        await self.recovery.remove_orphans(stray_keys)

    # ------------------------------------------------------------------ teardown

    async def teardown(self, sandbox: Sandbox, host: names.HostNames) -> None:
        self.tiers.cancel_disk_tier(sandbox.sandbox_id)
        await self.cgroup_for(host).kill_all()
        record = sandbox.extra.get("record")
        binary = (
            self.commands.for_teardown(sandbox.sandbox_id, record)
            if isinstance(record, GVisorRecord)
            else self.commands.default
        )
        await self.commands.delete(host.container, [binary])
        if isinstance(record, GVisorRecord):
            await self.uplinks.remove(record)

    async def close(self) -> None:
        self.tiers.close()
        await self.warm.pool.close()
        await super().close()
