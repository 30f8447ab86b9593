"""The process driver: bubblewrap in a network namespace of its own, limited by cgroups.

The fallback where gVisor is missing. Weaker than gvisor in two ways, and it says so:
  * isolation is Linux namespaces + a reduced capability set, not a separate kernel;
  * there is no memory snapshot (CRIU is the only tool for that and it fails on our kernels): a
    "snapshot" is the sandbox's writable filesystem layer plus its spec, so restore() cold-starts
    the app on a copy of that layer, and suspend() freezes the cgroup, keeping RAM resident.

Per sandbox:
  * a network namespace with only `lo`. The driver opens sockets inside it (see netns.py), so it
    reaches the app on 127.0.0.1 directly; nothing else is in there, so the sandbox reaches neither
    the host nor other sandboxes.
  * an overlayfs: the image read-only below, <state dir>/upper above. It is mounted inside a private
    mount namespace of the sandbox's launcher, so it never appears in the host's mount table and
    disappears with the sandbox's last process.
  * cgroups (memory, cpu, pids, freezer), joined by the launcher before anything else runs.
  * the guest agent as PID 1 of a new PID namespace (bwrap --as-pid-1), listening on
    127.0.0.1:AGENT_PORT for status and terminal sessions.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

from . import agent_build, names, netns, oci, proc, rootfs
from .agent_client import AGENT_PORT, AgentAddress
from .base import (
    SNAPSHOT_FILE,
    BaseDriver,
    SnapshotMeta,
    discard_snapshot_contents,
    log,
    prepare_snapshot_dir,
    read_snapshot_meta,
    record_of,
    write_private,
)
from .driver import (
    DriverCapabilities,
    DriverError,
    PortNotListening,
    Sandbox,
    SandboxSpec,
    SnapshotError,
    SnapshotInfo,
)
from .rootfs import overlay_safe

LAYER = "upper"  # the writable layer, in a state dir and in a snapshot
# $1 cgroup.procs files, $2 overlay options, $3 mount point, $4 netns path; then bwrap and its args.
_LAUNCHER = (
    'for f in $1; do echo $$ > "$f" || exit 125; done; '
    'mount -t overlay omv-layer -o "$2" "$3" || exit 125; '
    'netns="$4"; shift 4; '
    'exec nsenter --net="$netns" -- "$@"'
)


class ProcessDriver(BaseDriver):
    name = "process"
    capabilities = DriverCapabilities(memory_snapshot=False, suspend_releases_memory=False)
    cold_start_footprint_bytes = 32 * 1024 * 1024

    def __init__(self, state_root: Path, cache_dir: Path, **options: object) -> None:
        super().__init__(state_root, cache_dir, **options)  # type: ignore[arg-type]
        tools = {}
        for tool in ("bwrap", "unshare", "nsenter", "sh"):
            found = shutil.which(tool)
            if found is None:
                raise DriverError(f"the process driver needs {tool} (bubblewrap / util-linux)")
            tools[tool] = found
        self.tools = tools

    # ------------------------------------------------------------------ pieces

    def namespaces(self, host: names.HostNames) -> list[str]:
        return [host.netns]

    def agent_address(self, sandbox: Sandbox) -> AgentAddress:
        name = self.names_of(sandbox).netns

        async def open_socket() -> socket.socket:
            return await netns.connect(name, "127.0.0.1", AGENT_PORT, timeout=5.0)

        return AgentAddress(open_socket, record_of(sandbox).token)

    def _bwrap_argv(self, sandbox: Sandbox, merged: Path, agent: Path) -> list[str]:
        spec = sandbox.spec
        user = rootfs.resolve_user(spec.rootfs, spec.process.user)
        argv = [
            self.tools["bwrap"],
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            spec.hostname,
            "--bind",
            str(merged),
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/dev/shm",
            "--ro-bind",
            str(agent),
            oci.AGENT_IN_SANDBOX,
            "--chdir",
            "/",
            "--as-pid-1",
            "--new-session",
            "--cap-drop",
            "ALL",
        ]
        for cap in oci.capability_set(spec.all_capabilities):
            argv += ["--cap-add", cap]
        argv += [
            "--",
            oci.AGENT_IN_SANDBOX,
            "--listen",
            f"127.0.0.1:{AGENT_PORT}",
            "--uid",
            str(user.uid),
            "--gid",
            str(user.gid),
            "--groups",
            ",".join(str(g) for g in user.groups),
            "--workdir",
            spec.process.workdir or "/",
            "--",
            *spec.process.argv,
        ]
        return argv

    async def _boot(self, sandbox: Sandbox, agent: Path, grace: float) -> None:
        """Cold-start the sandbox on the writable layer already in its state dir."""
        spec = sandbox.spec
        host = self.names_of(sandbox)
        cgroup = self.cgroup_for(host)
        cgroup.create(self.cgroup_limits(spec))
        await netns.create(host.netns)
        upper, work, merged = (sandbox.state_dir / name for name in (LAYER, "work", "merged"))
        for path in (upper, work, merged):
            path.mkdir(exist_ok=True)
        options = (
            f"lowerdir={overlay_safe(spec.rootfs.resolve())},upperdir={overlay_safe(upper)},"
            f"workdir={overlay_safe(work)}"
        )
        user = rootfs.resolve_user(spec.rootfs, spec.process.user)
        # The launcher's environment reaches the agent through bwrap; the agent keeps
        # OMV_AGENT_TOKEN to itself and hands the rest to the app.
        env = rootfs.app_environment(spec.process, user)
        env["OMV_AGENT_TOKEN"] = record_of(sandbox).token
        argv = [
            str(await agent_build.ensure_shim(self.cache_dir)),
            "--",
            self.tools["unshare"],
            "-m",
            "--propagation",
            "private",
            self.tools["sh"],
            "-c",
            _LAUNCHER.replace("nsenter", self.tools["nsenter"]),
            "omv-launch",
            " ".join(str(path) for path in cgroup.procs_files()),
            options,
            str(merged),
            str(netns.path_of(host.netns)),
            *self._bwrap_argv(sandbox, merged, agent),
        ]
        result = await proc.run(argv, check=False, env=env, stdout_path=self.log_path(sandbox), timeout=60)
        if result.returncode != 0:
            raise DriverError(f"cannot start the sandbox: {proc.tail(self.log_path(sandbox))}")
        await self.wait_ready(sandbox, grace=grace)
        record_of(sandbox).state = "running"
        self.save(sandbox)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        with self.creating(sandbox_id):
            return await self._start(sandbox_id, spec)

    async def _start(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        self.check_spec(spec)
        self.gate.check("start a sandbox", self.cold_start_footprint_bytes, spec.memory_mib)
        agent = await agent_build.ensure_agent(self.cache_dir)
        sandbox = self.new_sandbox(sandbox_id, spec, self.new_token(), agent)
        try:
            await self._boot(sandbox, agent, self.exit_grace)
            log.info("process sandbox %s started", sandbox_id)
            return sandbox
        except BaseException:
            await self.destroy_quietly(sandbox)
            raise

    async def connect(self, sandbox: Sandbox, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.require_running(sandbox)
        try:
            sock = await netns.connect(self.names_of(sandbox).netns, "127.0.0.1", port, timeout=10.0)
        except ConnectionRefusedError:
            status = await self.app_status(sandbox)
            message = f"nothing in the sandbox accepts connections on port {port}"
            if status.state != "running":
                message += f": {status.detail}"
            raise PortNotListening(message) from None
        except (OSError, TimeoutError) as error:
            raise DriverError(f"cannot reach sandbox {sandbox.sandbox_id}: {error}") from None
        return await asyncio.open_connection(sock=sock)

    async def snapshot(self, sandbox: Sandbox, snapshot_dir: Path) -> SnapshotInfo:
        async with self.lock(sandbox.sandbox_id):
            self.refresh(sandbox)
            record = self.require_running(sandbox)
            prepare_snapshot_dir(snapshot_dir)
            cgroup = self.cgroup_of(sandbox)
            # Frozen, the app cannot change its files halfway through the copy.
            await cgroup.freeze()
            try:
                footprint = cgroup.memory_bytes()
                upper = sandbox.state_dir / LAYER
                disk_bytes = await asyncio.to_thread(rootfs.tree_size, upper)
                await proc.run(
                    ["cp", "-a", "--reflink=auto", str(upper), str(snapshot_dir / LAYER)], timeout=600
                )
                meta = SnapshotMeta(self.name, sandbox.spec, record.token, footprint, disk_bytes)
                write_private(snapshot_dir / SNAPSHOT_FILE, meta.to_json())
            except BaseException:
                discard_snapshot_contents(snapshot_dir)
                cgroup.thaw()
                raise
            await self._destroy_locked(sandbox)
        return SnapshotInfo(snapshot_dir, 0, disk_bytes, await self.code_bytes(sandbox.spec.rootfs))

    async def restore(self, sandbox_id: str, snapshot_dir: Path, *, egress: bool = False) -> Sandbox:
        # No internet egress here (capabilities.internet_egress is False): the sandbox has no network.
        with self.creating(sandbox_id):
            return await self._restore(sandbox_id, snapshot_dir)

    async def _restore(self, sandbox_id: str, snapshot_dir: Path) -> Sandbox:
        meta = read_snapshot_meta(snapshot_dir, self.name)
        layer = snapshot_dir / LAYER
        if not layer.is_dir():
            raise SnapshotError(f"snapshot {snapshot_dir} is incomplete: the {LAYER} layer is missing")
        self.gate.check(
            "restore a sandbox",
            max(meta.footprint_bytes, self.cold_start_footprint_bytes),
            meta.spec.memory_mib,
        )
        agent = await agent_build.ensure_agent(self.cache_dir)
        # No memory to carry over, so each restore gets its own agent secret.
        sandbox = self.new_sandbox(sandbox_id, meta.spec, self.new_token(), agent)
        try:
            result = await proc.run(
                ["cp", "-a", "--reflink=auto", str(layer), str(sandbox.state_dir / LAYER)],
                check=False,
                timeout=600,
            )
            if result.returncode != 0:
                raise SnapshotError(
                    f"cannot copy the filesystem layer of snapshot {snapshot_dir}: {result.describe()}"
                )
            await self._boot(sandbox, agent, 0.0)
            return sandbox
        except BaseException:
            await self.destroy_quietly(sandbox)
            raise

    async def suspend(self, sandbox: Sandbox) -> None:
        async with self.lock(sandbox.sandbox_id):
            self.refresh(sandbox)
            record = self.require_running(sandbox)
            await self.cgroup_of(sandbox).freeze()
            # A crash between the freeze and this write is no matter: adopt() trusts the freezer.
            record.state, record.suspended_in = "suspended", "memory"
            self.save(sandbox)

    async def resume(self, sandbox: Sandbox) -> None:
        async with self.lock(sandbox.sandbox_id):
            record = self.refresh(sandbox)
            if record.state != "suspended":
                raise DriverError(f"sandbox {sandbox.sandbox_id} is not suspended")
            self.cgroup_of(sandbox).thaw()
            record.state, record.suspended_in = "running", ""
            self.save(sandbox)

    async def adopt(self, sandbox_id: str) -> Sandbox | None:
        sandbox = self.load(sandbox_id)
        if sandbox is None:
            return None
        async with self.lock(sandbox_id):
            record = record_of(sandbox)
            if record.state == "starting":
                await self.drop_unfinished(sandbox)
                return None
            cgroup = self.cgroup_of(sandbox)
            if not cgroup.pids():
                return None
            # Suspending and resuming are a freeze and a thaw here: the freezer says which side of
            # one a sandbox is on, whatever a record written just before a crash says.
            state = ("suspended", "memory") if cgroup.is_frozen() else ("running", "")
            if (record.state, record.suspended_in) != state:
                record.state, record.suspended_in = state
                self.save(sandbox)
            return sandbox
