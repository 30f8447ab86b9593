"""The gvisor driver: every sandbox is a runsc (gVisor) sandbox.

Which runsc: see runsc.py. New sandboxes run under the newest runsc that works here (Debian 13's
0.0~20240729 from runsc_install.py, else Debian 12's 0.0~20221219), on the ptrace platform unless
told to use systrap (runsc.py says why), and every sandbox and snapshot keeps the runsc it was made
with: a checkpoint restores only under the runsc version that wrote it.

Memory snapshots are `runsc checkpoint` / `runsc restore`: a restored sandbox continues every
process with its memory, open files and listening sockets, and any number of sandboxes can be
restored from one image.

Network topology, per sandbox (runsc needs all of this to checkpoint a networked sandbox):

    [sandbox netns]  eth0 169.254.77.2/30  <--veth-->  veth0 169.254.77.1/30  [peer netns]
    gVisor's netstack takes eth0 over            the driver opens its sockets here

Every sandbox restored from one image has the same inner address (the snapshot carries gVisor's
network configuration), so each sandbox gets its own small peer namespace holding the other end
of its veth pair, and the driver reaches a sandbox by creating its socket inside that peer
namespace. The sandbox's default route leads to the peer namespace, and no further unless the
sandbox has internet egress (SandboxSpec.egress): then the peer namespace has an uplink to the host
that forwards and masquerades the sandbox's traffic, and the host lets it out to the world, never to
itself (loopback or otherwise), link-local addresses, other sandboxes or denied networks (egress.py).
A sandbox restored ahead of time for the warm pool gets its uplink switched off while it waits;
restore() switches it on when the MicroVM asks for egress.

The app's 127.0.0.1 is gVisor's own loopback, out of reach of any host socket, so connections to
app ports are relayed by the guest agent (agent/agent.c), which runs as the sandbox's init and
listens on 169.254.77.2:AGENT_PORT.

Every runsc command runs inside a private mount namespace where /proc/sys/net is hidden under an
empty tmpfs: runsc (2022 and 2024 alike) decides "am I in the root network namespace?" by looking
for /proc/sys/net/core/rmem_default, which newer kernels show in every namespace, and would refuse
--network=sandbox. Both also take the address off eth0 when netstack takes the interface over, and
a restore answers only when the address is on eth0 before it starts (netns.ensure_address).

runsc 2022 refuses to checkpoint while a TCP connection on eth0 is open, and cannot checkpoint an
app whose epoll instance watches a listening socket (asyncio, aiohttp, uvicorn: "encoding error at
object tcp.endpoint"). runsc 2024 checkpoints those apps, and with --net-disconnect-ok resets open
eth0 connections at a checkpoint instead of refusing (the retry loop in _checkpoint stays for 2022).

The writable layer is runsc's in-memory overlay (--overlay2=root:memory) over the read-only image:
a checkpoint carries it. (runsc 2022 also offers a file-backed overlay, --overlay2=root:<dir>, but
its checkpoint fails with "encoding error at object tmpfs.filesystem"; measured 2026-11. runsc
2024's default, root:self, would put the overlay's file into the sandbox root, a 1 MiB tmpfs here.)
Files the app writes therefore count against its memory limit.

Suspend has two tiers: the sandbox is frozen at once (cgroup freezer; resume is a thaw, a few ms)
and its memory goes to disk (checkpoint, RAM freed) after `suspend_to_disk_after` seconds, or at
once when that is 0. Restores of a hot snapshot come from a warm pool (pool.py).

Crash safety: the record says which side of a transition the sandbox is on ("suspending" before a
freeze or a checkpoint starts, "suspended" after; "resuming" before a restore, "running" after),
and the checkpoint and restore commands, which run in sessions of their own and so finish even
when the server is killed under them, leave a marker once they have succeeded (CHECKPOINT_DONE,
RESTORE_DONE; the launcher writes it, see _LAUNCHER) and their pid while they run. adopt() waits
for such a command still running, then keeps a complete suspend image (the sandbox is suspended),
drops an incomplete one (the sandbox is running, or suspended in memory, when it still is; gone
otherwise), and takes a finished restore as running, an unfinished one as suspended.

No runtime path asks runsc about a container's state (`runsc state`, `runsc list`): both hang on a
frozen sandbox (a warm one, one suspended in memory). Containers are found from runsc's state
files (_containers), and every runsc command has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

from openmicrovm.builder.build_network import allowed_networks, build_resolv_conf
from openmicrovm.idmap import ID_COUNT, id_base_problem

from . import agent_build, agent_client, egress, names, netns, oci, proc, rootfs
from . import runsc as runsc_binaries
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
from .host import MIB
from .pool import RestorePool
from .rootfs import overlay_safe
from .runsc import Runsc, RunscError

SANDBOX_IP = "169.254.77.2"
SANDBOX_CIDR = f"{SANDBOX_IP}/30"
PEER_IP = "169.254.77.1"
PEER_CIDR = f"{PEER_IP}/30"
SANDBOX_DEV = "eth0"
PEER_DEV = "veth0"
MEMORY_IMAGE = "memory"  # directory inside a snapshot holding runsc's checkpoint.img
SNAPSHOT_AGENT = "omv-agent"  # the agent binary the snapshot's processes were started from
SUSPEND_IMAGE = "suspended"  # directory inside a sandbox's state dir while it is suspended to disk
CHECKPOINT_ATTEMPTS = 5
# Host tasks a sandbox may have beyond the spec's pids_max: gVisor's own threads (sentry, gofer)
# and the ptrace platform's stubs, one host process per guest address space with a host thread per
# sentry thread that ran it, all count against the sandbox's pids cgroup, and gVisor dies when it
# cannot create a thread. Measured (2-core machine, runsc 20240729, ptrace): 55-130 host tasks for
# an idle sandbox, ~90 while 128 connections are relayed to a threaded app; a fork bomb reaches
# ~14 host threads per guest process and meets the memory limit at ~1200 host tasks.
PIDS_HEADROOM = 512
# Markers in a sandbox's state dir, written by the launcher when `runsc checkpoint` (suspend to
# disk) or `runsc restore` (resume from disk) succeeded; "<marker>.pid" holds the launcher's pid
# while the command runs. See the module docstring (crash safety).
CHECKPOINT_DONE = "checkpoint.done"
RESTORE_DONE = "restore.done"
# How long adopt() waits for a checkpoint or restore that a killed server left running.
HELPER_WAIT_SECONDS = 300.0

# Runs every runsc command: hides /proc/sys/net (see the module docstring) and, for run/restore (in
# the sandbox's cgroups already: the shim joined them), first mounts the sandbox's root (see
# _root_options), with the host's resolvers in its /etc/resolv.conf when the host has reachable ones
# ($OMV_RESOLV, written to the root's throwaway upper layer, never to the image; the link is removed
# first so that a symlink in the image cannot point the write at a host file). With $OMV_IDMAP set
# (an image owned by shifted host ids, SandboxSpec.rootfs_id_base) the overlay's lower layer is an
# idmapped mount of the image that shows those files with container ids (omv-idmap, agent/idmap.c);
# the overlay is then nosuid and nodev too, since through it an image's setuid file now looks owned
# by host root, and the host kernel would honour it (gVisor applies setuid bits itself, from the
# mode bits, and runs no host binary from the image). The mounts live in the launcher's private
# mount namespace, which runsc's processes inherit, so the host never sees them and they vanish with
# the sandbox. With $OMV_DONE set it stays to write its pid to $OMV_DONE.pid first and the marker
# $OMV_DONE once the command succeeded (crash safety, see above).
_LAUNCHER = (
    'if [ -n "$OMV_ROOT" ]; then '
    'mount -t tmpfs -o size=1m,mode=0755 omv-stub "$OMV_STUB" && mkdir "$OMV_STUB/u" "$OMV_STUB/w" && '
    "lower=$OMV_IMAGE && flags= && "
    'if [ -n "$OMV_IDMAP" ]; then mkdir "$OMV_STUB/image" && '
    '"$OMV_IDMAP" "$OMV_IMAGE" "$OMV_STUB/image" "$OMV_ID_BASE" 0 "$OMV_ID_COUNT" && '
    "lower=$OMV_STUB/image && flags=nosuid,nodev,; fi && "
    'mount -t overlay omv-root -o "${flags}lowerdir=$lower,upperdir=$OMV_STUB/u,workdir=$OMV_STUB/w" "$OMV_ROOT" '
    "|| exit 125; fi; "
    'if [ -n "$OMV_RESOLV" ] && [ -d "$OMV_ROOT/etc" ] && [ ! -L "$OMV_ROOT/etc" ]; then '
    '{ rm -f "$OMV_ROOT/etc/resolv.conf" && cat "$OMV_RESOLV" > "$OMV_ROOT/etc/resolv.conf"; } 2>/dev/null; fi; '
    "mount -t tmpfs omv-netfix /proc/sys/net || exit 125; "
    'if [ -n "$OMV_DONE" ]; then echo $$ > "$OMV_DONE.pid" || exit 125; "$@"; s=$?; '
    '[ $s -ne 0 ] || : > "$OMV_DONE" || s=125; exit $s; fi; '
    'exec "$@"'
)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class GVisorDriver(BaseDriver):
    name = "gvisor"
    capabilities = DriverCapabilities(
        memory_snapshot=True, suspend_releases_memory=True, internet_egress=True
    )
    cold_start_footprint_bytes = 96 * MIB

    def __init__(
        self,
        state_root: Path,
        cache_dir: Path,
        *,
        runsc: str | None = None,
        runsc_platform: str | None = None,
        egress_allow_networks: Iterable[str] = (),
        **options: object,
    ) -> None:
        """runsc: the runsc binary for new sandboxes (default: $OPENMICROVM_RUNSC, else the newest
        that works here); runsc_platform: its platform (default: $OPENMICROVM_RUNSC_PLATFORM, else
        ptrace; systrap is the other one that works on these hosts); egress_allow_networks: the
        private networks sandboxes with egress may reach (the setting of that name; an invalid
        entry raises EgressSettingError here, at server start)."""
        self.egress_allow = allowed_networks(egress_allow_networks)
        super().__init__(state_root, cache_dir, **options)  # type: ignore[arg-type]
        try:
            self.runsc = runsc_binaries.choose(runsc, [cache_dir])
            self.platform = runsc_binaries.choose_platform(self.runsc, runsc_platform)
        except RunscError as error:
            raise DriverError(str(error)) from None
        log.info("gvisor driver: %s, %s platform", self.runsc.describe(), self.platform)
        self.runsc_root = state_root / "runsc"
        self.runsc_root.mkdir(parents=True, exist_ok=True)
        for mount_point in (self.root_mount, self.state_root / "mnt" / "stub"):
            mount_point.mkdir(parents=True, exist_ok=True)
        self.unshare = shutil.which("unshare") or "unshare"
        self.shell = shutil.which("sh") or "/bin/sh"
        self._disk_timers: dict[str, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.pool = RestorePool(self.restore_pool_size, self._make_warm, self._hand_out, self._discard_warm)

    # ------------------------------------------------------------------ runsc

    def _runsc_argv(self, binary: tuple[Runsc, str], args: list[str]) -> list[str]:
        runsc, platform = binary
        return [
            runsc.path,
            "--root",
            str(self.runsc_root),
            f"--platform={platform}",
            "--network=sandbox",
            "--overlay2=root:memory",
            "--cpu-num-from-quota",
            # Otherwise runsc removes CAP_NET_RAW, which spec §5.8 grants; the only link a raw
            # socket could write to leads to the sandbox's own empty peer namespace.
            "--net-raw",
            # A checkpoint resets connections on eth0 instead of refusing (the agent has already
            # dropped them; this covers one still closing). Connections on the sandbox's own
            # loopback are saved and restored as they are.
            *(["--net-disconnect-ok"] if runsc.has_flag("net-disconnect-ok") else []),
            *args,
        ]

    @property
    def default_binary(self) -> tuple[Runsc, str]:
        return self.runsc, self.platform

    def binary_of(self, sandbox: Sandbox) -> tuple[Runsc, str]:
        """The runsc a sandbox runs under, and its platform."""
        record = record_of(sandbox)
        if not record.runsc:  # made before the driver chose: the runsc on PATH, on ptrace
            legacy = runsc_binaries.system_binary()
            found = runsc_binaries.probe(legacy) if legacy else None
            if found is None:
                raise DriverError(f"sandbox {sandbox.sandbox_id} runs under runsc from PATH, which is gone")
            return found, record.runsc_platform or "ptrace"
        found = runsc_binaries.probe(record.runsc)
        if found is None:
            raise DriverError(
                f"sandbox {sandbox.sandbox_id} runs under {record.runsc}, which does not run any more"
            )
        return found, record.runsc_platform or found.default_platform

    def _binary_for_snapshot(self, snapshot_dir: Path, meta: SnapshotMeta) -> tuple[Runsc, str]:
        """A runsc of the version that wrote the snapshot's checkpoint."""
        if not meta.runsc_version:  # made before snapshots recorded it: by the runsc on PATH
            legacy = runsc_binaries.system_binary()
            found = runsc_binaries.probe(legacy) if legacy else None
            if found is None:
                raise SnapshotError(
                    f"snapshot {snapshot_dir} was made by the runsc on PATH, and there is none any more"
                )
            return found, meta.runsc_platform or "ptrace"
        found = runsc_binaries.with_version(meta.runsc_version, self.runsc, [self.cache_dir])
        if found is None:
            have = ", ".join(r.version for r in runsc_binaries.installed([self.cache_dir])) or "none"
            raise SnapshotError(
                f"snapshot {snapshot_dir} was made by runsc {meta.runsc_version}, which is not installed "
                f"here (installed: {have}); build the image version again"
            )
        platform = meta.runsc_platform or found.default_platform
        if platform not in found.platforms:
            platform = found.default_platform
        return found, platform

    def _set_binary(self, sandbox: Sandbox, binary: tuple[Runsc, str]) -> None:
        record = record_of(sandbox)
        record.runsc, record.runsc_platform = binary[0].path, binary[1]
        self.save(sandbox)

    async def _runsc(
        self,
        args: list[str],
        *,
        binary: tuple[Runsc, str] | None = None,
        launcher: bool = False,
        root: dict[str, str] | None = None,
        log_file: Path | None = None,
        shim: list[str] | None = None,
        done: Path | None = None,
        timeout: float = 120.0,
    ) -> proc.Completed:
        """Every runsc command goes through here, with a timeout. root (launcher only): the
        sandbox root to mount (_root_options); shim: omv-shim's argv to run the command under
        (agent_build.shim_prefix); done (launcher only): the marker to write when the command
        succeeds (see _LAUNCHER)."""
        argv = self._runsc_argv(binary or self.default_binary, args)
        env = {"PATH": os.environ.get("PATH", rootfs.DEFAULT_PATH)}
        if done is not None:
            env["OMV_DONE"] = str(done)
        if launcher:
            argv = [
                self.unshare,
                "-m",
                "--propagation",
                "private",
                self.shell,
                "-c",
                _LAUNCHER,
                "omv-runsc",
                *argv,
            ]
        if root is not None:
            env.update(root)
        if shim is not None:
            argv = [*shim, *argv]
        return await proc.run(argv, check=False, timeout=timeout, env=env, stdout_path=log_file)

    def _containers(self) -> set[str]:
        """The ids of the containers runsc keeps state for under our root, read from its state
        files (runsc 2024: <id>_sandbox:<sandbox>.state; older runsc: a directory per container),
        never by asking runsc: `runsc list -format json` and `runsc state` hang on a frozen sandbox."""
        found: set[str] = set()
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.runsc_root):
                if entry.name.endswith(".state"):
                    found.add(entry.name.removesuffix(".state").split("_sandbox:")[0])
                elif entry.is_dir() and names.key_of_container(entry.name) is not None:
                    found.add(entry.name)
        return found

    @property
    def root_mount(self) -> Path:
        """Where every sandbox's root is mounted, in its own mount namespace: one path for all, so
        a checkpoint and every restore of it see the same root path."""
        return self.state_root / "mnt" / "root"

    async def _root_options(self, sandbox: Sandbox) -> dict[str, str]:
        """The sandbox root: a kernel overlay of the image under a throwaway tmpfs. runsc creates
        mount points (/.omv/agent, and /proc, /dev, /sys where an image lacks them) in the root it
        is given, before its own in-memory overlay applies; this keeps those writes off the image.

        An image owned by shifted host ids (rootfs_id_base) is shown through an idmapped mount with
        container ids, at every run and every restore alike: a checkpoint records the files' ids
        as the app saw them, so a restore must see the same ones."""
        options = {
            "OMV_STUB": str(self.state_root / "mnt" / "stub"),
            "OMV_IMAGE": overlay_safe(sandbox.spec.rootfs.resolve()),
            "OMV_ROOT": str(self.root_mount),
            "OMV_RESOLV": self._resolver_file(),
        }
        id_base = sandbox.spec.rootfs_id_base
        if id_base:
            problem = id_base_problem(id_base)
            if problem is not None:
                raise DriverError(problem)
            tool = await agent_build.ensure_idmap(self.cache_dir)
            options.update(OMV_IDMAP=str(tool), OMV_ID_BASE=str(id_base), OMV_ID_COUNT=str(ID_COUNT))
        return options

    def _resolver_file(self) -> str:
        """A resolv.conf with the host's resolvers that a sandbox with egress can reach (as a
        build's, see build_network.build_resolv_conf), or "" when the host has none. Read afresh at
        every run and restore: the host's resolvers may change while snapshots stay."""
        text, servers = build_resolv_conf("a MicroVM")
        if not servers:
            return ""
        path = self.state_root / "resolv.conf"
        if _read_text(path) != text:
            write_private(path, text)  # the launcher, which reads it, runs as root
        return str(path)

    async def _launch(self, sandbox: Sandbox, args: list[str], done: Path | None = None) -> proc.Completed:
        """run / restore: the sandbox inherits the launcher's stdio, which is the app log, and the
        shim becomes the parent of the sandbox processes runsc leaves behind."""
        return await self._runsc(
            args,
            binary=self.binary_of(sandbox),
            launcher=True,
            root=await self._root_options(sandbox),
            log_file=self.log_path(sandbox),
            shim=await agent_build.shim_prefix(
                self.cache_dir, self.cgroup_of(sandbox).procs_files(), wait=True
            ),
            done=done,
        )

    # ------------------------------------------------------------------ pieces

    def namespaces(self, host: names.HostNames) -> list[str]:
        return [host.netns, host.peer_netns]

    def agent_address(self, sandbox: Sandbox) -> AgentAddress:
        peer = self.names_of(sandbox).peer_netns

        async def open_socket() -> socket.socket:
            return await netns.connect(peer, SANDBOX_IP, AGENT_PORT, timeout=5.0)

        return AgentAddress(open_socket, record_of(sandbox).token)

    async def _create_host_side(self, sandbox: Sandbox) -> None:
        host = self.names_of(sandbox)
        await self.create_cgroup(host, self.cgroup_limits(sandbox.spec, PIDS_HEADROOM))
        await netns.create_pair(host.netns, host.peer_netns, SANDBOX_CIDR, PEER_CIDR, SANDBOX_DEV, PEER_DEV)

    def _write_bundle(self, sandbox: Sandbox, agent_binary: Path) -> Path:
        record = record_of(sandbox)
        spec = sandbox.spec
        user = rootfs.resolve_user(spec.rootfs, spec.process.user)
        env = rootfs.app_environment(spec.process, user)
        env["OMV_AGENT_TOKEN"] = record.token
        args = [
            oci.AGENT_IN_SANDBOX,
            "--listen",
            f"{SANDBOX_IP}:{AGENT_PORT}",
            "--max-relays",
            str(agent_client.MAX_RELAYED_CONNECTIONS),
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
        config = oci.runsc_spec(
            rootfs=self.root_mount,
            agent_binary=agent_binary,
            args=args,
            env=env,
            hostname=spec.hostname,
            all_capabilities=spec.all_capabilities,
            netns_path=netns.path_of(self.names_of(sandbox).netns),
            cgroups_path=self.cgroup_of(sandbox).path,
        )
        bundle = sandbox.state_dir / "bundle"
        bundle.mkdir(exist_ok=True)
        write_private(bundle / "config.json", json.dumps(config, indent=1))
        return bundle

    # ------------------------------------------------------------------ start, connect

    async def start(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        with self.creating(sandbox_id):
            return await self._start(sandbox_id, spec)

    async def _start(self, sandbox_id: str, spec: SandboxSpec) -> Sandbox:
        self.check_spec(spec)
        self.gate.check("start a sandbox", self.cold_start_footprint_bytes, spec.memory_mib)
        agent = await agent_build.ensure_agent(self.cache_dir)
        sandbox = self.new_sandbox(sandbox_id, spec, self.new_token(), agent)
        try:
            self._set_binary(sandbox, self.default_binary)
            await self._create_host_side(sandbox)
            bundle = self._write_bundle(sandbox, agent)
            container = self.names_of(sandbox).container
            result = await self._launch(sandbox, ["run", "--detach", "--bundle", str(bundle), container])
            if result.returncode != 0:
                raise DriverError(f"runsc could not start the sandbox: {proc.tail(self.log_path(sandbox))}")
            await self.wait_ready(sandbox, grace=self.exit_grace)
            record_of(sandbox).state = "running"
            self.save(sandbox)
            log.info("gvisor sandbox %s started", sandbox_id)
            return sandbox
        except BaseException:
            await self.destroy_quietly(sandbox)
            raise

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

    async def _checkpoint(
        self, sandbox: Sandbox, image_dir: Path, done: Path | None = None
    ) -> proc.Completed:
        """runsc checkpoint, which refuses while a TCP connection on eth0 is open: the agent drops
        them all first, and a connection that was just closing (one round trip in LAST_ACK) is
        waited out by trying again; a refused checkpoint leaves the sandbox running. done: the
        marker the launcher writes when the checkpoint succeeded."""
        container = self.names_of(sandbox).container
        for attempt in range(CHECKPOINT_ATTEMPTS):
            await agent_client.control(self.agent_address(sandbox), "ABORT")
            result = await self._runsc(
                ["checkpoint", "--image-path", str(image_dir), container],
                binary=self.binary_of(sandbox),
                launcher=True,
                done=done,
                timeout=600,
            )
            if (
                result.returncode == 0
                or "cannot be saved in connected state" not in result.stdout + result.stderr
            ):
                return result
            log.info("checkpoint of %s met a closing connection; trying again", sandbox.sandbox_id)
            await asyncio.sleep(0.02 * 2**attempt)
        return result

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
                result = await self._checkpoint(sandbox, image)
                if result.returncode != 0:
                    raise SnapshotError(
                        f"runsc could not checkpoint sandbox {sandbox.sandbox_id}: {result.describe()}"
                    )
                runsc, platform = self.binary_of(sandbox)
                meta = SnapshotMeta(
                    self.name, sandbox.spec, record.token, footprint, disk_bytes, runsc.version, platform
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

    def _check_snapshot(self, snapshot_dir: Path) -> SnapshotMeta:
        meta = read_snapshot_meta(snapshot_dir, self.name)
        checkpoint = snapshot_dir / MEMORY_IMAGE / "checkpoint.img"
        if not checkpoint.is_file() or checkpoint.stat().st_size == 0:
            raise SnapshotError(
                f"snapshot {snapshot_dir} is incomplete: {MEMORY_IMAGE}/checkpoint.img is missing"
            )
        if not (snapshot_dir / SNAPSHOT_AGENT).is_file():
            raise SnapshotError(f"snapshot {snapshot_dir} is incomplete: {SNAPSHOT_AGENT} is missing")
        return meta

    async def restore(self, sandbox_id: str, snapshot_dir: Path, *, egress: bool = False) -> Sandbox:
        names.check_sandbox_id(sandbox_id)
        meta = self._check_snapshot(snapshot_dir)
        self._binary_for_snapshot(snapshot_dir, meta)  # fails early when no runsc can restore it
        if self.state_dir(sandbox_id).exists():
            raise DriverError(f"sandbox {sandbox_id} already exists")
        with self.creating(sandbox_id):
            sandbox = await self.pool.take(snapshot_dir, sandbox_id, egress)
            if sandbox is None:
                self.gate.check("restore a sandbox", meta.footprint_bytes, meta.spec.memory_mib)
                sandbox = await self._restore_new(sandbox_id, snapshot_dir, meta, egress, uplink=egress)
        self.pool.restored(snapshot_dir)
        return sandbox

    async def _restore_new(
        self, sandbox_id: str, snapshot_dir: Path, meta: SnapshotMeta, egress: bool, *, uplink: bool
    ) -> Sandbox:
        """uplink: give the sandbox an uplink (switched on when egress), made while runsc restores
        so that it costs the restore no time."""
        agent = snapshot_dir / SNAPSHOT_AGENT
        binary = self._binary_for_snapshot(snapshot_dir, meta)
        spec = dataclasses.replace(meta.spec, egress=egress)
        sandbox = self.new_sandbox(sandbox_id, spec, meta.token, agent)
        wiring: asyncio.Task[None] | None = None
        try:
            self._set_binary(sandbox, binary)
            await self._create_host_side(sandbox)
            if uplink:
                wiring = asyncio.create_task(self._attach_uplink(sandbox))
            bundle = self._write_bundle(sandbox, agent)
            image = snapshot_dir / MEMORY_IMAGE
            container = self.names_of(sandbox).container
            args = ["restore", "--detach", "--image-path", str(image), "--bundle", str(bundle), container]
            result = await self._launch(sandbox, args)
            if result.returncode != 0:
                raise SnapshotError(
                    f"cannot restore from snapshot {snapshot_dir} with {binary[0].describe()} "
                    f"(corrupt?): {proc.tail(self.log_path(sandbox), 1500)}"
                )
            await self.wait_ready(sandbox)
            if wiring is not None:
                await wiring
            record_of(sandbox).state = "running"
            self.save(sandbox)
            return sandbox
        except BaseException:
            if wiring is not None:
                wiring.cancel()
                await asyncio.gather(wiring, return_exceptions=True)
            await self.destroy_quietly(sandbox)
            raise

    async def _attach_uplink(self, sandbox: Sandbox) -> None:
        """An uplink for the sandbox's peer namespace, switched on if its spec asks for egress."""
        record = record_of(sandbox)

        def leased(index: int) -> None:
            record.uplink = index
            self.save(sandbox)

        peer = self.names_of(sandbox).peer_netns
        index = await egress.attach(peer, leased, self.egress_allow)
        if sandbox.spec.egress:
            await egress.enable(peer, index)

    # ------------------------------------------------------------------ the warm pool

    async def _make_warm(self, pool_id: str, snapshot_dir: Path) -> Sandbox:
        meta = self._check_snapshot(snapshot_dir)
        self.gate.check("keep a warm sandbox", meta.footprint_bytes, meta.spec.memory_mib)
        # Every warm sandbox gets an uplink, switched off: hand-out only switches it on.
        sandbox = await self._restore_new(pool_id, snapshot_dir, meta, False, uplink=True)
        try:
            await self.cgroup_of(sandbox).freeze()
            record_of(sandbox).state = "warm"
            self.save(sandbox)
        except BaseException:
            await self.destroy_quietly(sandbox)
            raise
        return sandbox

    async def _hand_out(self, pool_id: str, sandbox_id: str, wants_egress: bool) -> Sandbox | None:
        warm = self.load(pool_id)
        if warm is None or record_of(warm).state != "warm" or record_of(warm).uplink < 0:
            return None
        target = self.state_dir(sandbox_id)
        try:
            target.mkdir(mode=0o700)  # claims the id; the rename below replaces this empty dir
        except FileExistsError:
            raise DriverError(f"sandbox {sandbox_id} already exists") from None
        os.rename(warm.state_dir, target)
        record = record_of(warm)
        record.sandbox_id, record.state = sandbox_id, "running"
        record.spec = dataclasses.replace(record.spec, egress=wants_egress)
        sandbox = Sandbox(sandbox_id, self.name, target, record.spec, {"record": record})
        self.save(sandbox)
        try:
            if wants_egress:  # before the thaw: the app's first packet may go out at once
                await egress.enable(self.names_of(sandbox).peer_netns, record.uplink)
            self.cgroup_of(sandbox).thaw()
            self.raise_if_app_down(sandbox, await agent_client.control(self.agent_address(sandbox), "STATUS"))
        except (OSError, TimeoutError, DriverError):
            log.warning("warm sandbox for %s did not answer after thawing; restoring afresh", sandbox_id)
            await self.destroy_quietly(sandbox)
            return None
        return sandbox

    async def _discard_warm(self, pool_id: str) -> None:
        sandbox = self.load(pool_id)
        if sandbox is not None:
            await self.destroy(sandbox)

    # ------------------------------------------------------------------ suspend and resume

    def _mark(self, sandbox: Sandbox, state: str, suspended_in: str) -> None:
        """Persist which side of a transition the sandbox is on (see the module docstring)."""
        record = record_of(sandbox)
        record.state, record.suspended_in = state, suspended_in
        self.save(sandbox)

    @staticmethod
    def _clear_marker(marker: Path) -> None:
        for path in (marker, marker.with_name(marker.name + ".pid")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def suspend(self, sandbox: Sandbox) -> None:
        async with self.lock(sandbox.sandbox_id):
            self.refresh(sandbox)
            record = self.require_running(sandbox)
            cgroup = self.cgroup_of(sandbox)
            record.footprint_bytes = cgroup.memory_bytes()
            if self.suspend_to_disk_after > 0:
                self._mark(sandbox, "suspending", "memory")
                try:
                    # Connections go first, as they would at a checkpoint: one closing while the
                    # sandbox is frozen could still be half-open when the disk tier checkpoints it.
                    await agent_client.control(self.agent_address(sandbox), "ABORT")
                    await cgroup.freeze()
                except BaseException:
                    with contextlib.suppress(DriverError):
                        cgroup.thaw()
                    self._mark(sandbox, "running", "")
                    raise
                self._mark(sandbox, "suspended", "memory")
                self._schedule_disk_tier(sandbox)
                return
            self._mark(sandbox, "suspending", "disk")
            try:
                await self._to_disk(sandbox)
            except BaseException:
                await self._settle_suspend(sandbox, wait=False)
                raise
            self._mark(sandbox, "suspended", "disk")

    async def _to_disk(self, sandbox: Sandbox) -> None:
        """Checkpoint a running sandbox into its state dir and stop it, freeing its memory. The
        caller has marked the record "suspending" (disk)."""
        image = sandbox.state_dir / SUSPEND_IMAGE
        marker = sandbox.state_dir / CHECKPOINT_DONE
        self._clear_marker(marker)
        await asyncio.to_thread(shutil.rmtree, image, True)
        image.mkdir()
        result = await self._checkpoint(sandbox, image, done=marker)
        if result.returncode != 0:
            await asyncio.to_thread(shutil.rmtree, image, True)
            raise DriverError(f"cannot suspend sandbox {sandbox.sandbox_id}: {result.describe()}")
        await self._stop_container(sandbox)

    async def _stop_container(self, sandbox: Sandbox) -> None:
        # Killing through the cgroup first makes `runsc delete` quick: it finds nothing to wait for.
        try:
            await self.cgroup_of(sandbox).kill_all()
        except DriverError:
            log.exception("stopping sandbox %s", sandbox.sandbox_id)
        container = self.names_of(sandbox).container
        if container in self._containers():
            await self._runsc(
                ["delete", "-force", container], binary=self._teardown_binary(sandbox), timeout=60
            )

    def _schedule_disk_tier(self, sandbox: Sandbox) -> None:
        self._cancel_disk_tier(sandbox.sandbox_id)
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._disk_timers.pop(sandbox.sandbox_id, None)
            task = loop.create_task(self._disk_tier(sandbox))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        self._disk_timers[sandbox.sandbox_id] = loop.call_later(self.suspend_to_disk_after, fire)

    def _cancel_disk_tier(self, sandbox_id: str) -> None:
        timer = self._disk_timers.pop(sandbox_id, None)
        if timer is not None:
            timer.cancel()

    async def _disk_tier(self, sandbox: Sandbox) -> None:
        """A frozen sandbox's memory goes to disk after a while."""
        async with self.lock(sandbox.sandbox_id):
            if not sandbox.state_dir.exists():
                return
            record = self.refresh(sandbox)
            if record.state != "suspended" or record.suspended_in != "memory":
                return
            cgroup = self.cgroup_of(sandbox)
            self._mark(sandbox, "suspending", "disk")
            cgroup.thaw()  # runsc checkpoints a running sandbox only
            try:
                await self._to_disk(sandbox)
            except Exception:
                log.exception(
                    "sandbox %s stays suspended in memory: writing it to disk failed", sandbox.sandbox_id
                )
                await self._settle_suspend(sandbox, wait=False)
                if record.state == "running":  # the checkpoint left it running: freeze it again
                    with contextlib.suppress(DriverError):
                        await cgroup.freeze()
                        self._mark(sandbox, "suspended", "memory")
                return
            self._mark(sandbox, "suspended", "disk")

    async def resume(self, sandbox: Sandbox) -> None:
        async with self.lock(sandbox.sandbox_id):
            record = self.refresh(sandbox)
            if record.state != "suspended":
                raise DriverError(f"sandbox {sandbox.sandbox_id} is not suspended")
            self._cancel_disk_tier(sandbox.sandbox_id)
            tier = record.suspended_in
            self._mark(sandbox, "resuming", tier)
            try:
                if tier == "memory":
                    self.cgroup_of(sandbox).thaw()
                else:
                    await self._resume_from_disk(sandbox)
            except BaseException:
                self._mark(sandbox, "suspended", tier)  # a failed restore was stopped: try again later
                raise
            self._mark(sandbox, "running", "")
            await self._drop_suspend_image(sandbox)

    async def _drop_suspend_image(self, sandbox: Sandbox) -> None:
        """Once the record says running: the suspend image and the markers have served."""
        await asyncio.to_thread(shutil.rmtree, sandbox.state_dir / SUSPEND_IMAGE, True)
        self._clear_marker(sandbox.state_dir / CHECKPOINT_DONE)
        self._clear_marker(sandbox.state_dir / RESTORE_DONE)

    async def _resume_from_disk(self, sandbox: Sandbox) -> None:
        record = record_of(sandbox)
        image = sandbox.state_dir / SUSPEND_IMAGE
        if not (image / "checkpoint.img").is_file():
            raise SnapshotError(f"the suspend image of sandbox {sandbox.sandbox_id} is missing")
        self.gate.check("resume a sandbox", record.footprint_bytes, sandbox.spec.memory_mib)
        host = self.names_of(sandbox)
        await netns.ensure_address(host.netns, SANDBOX_DEV, SANDBOX_CIDR, PEER_IP)
        bundle = sandbox.state_dir / "bundle"
        args = ["restore", "--detach", "--image-path", str(image), "--bundle", str(bundle), host.container]
        marker = sandbox.state_dir / RESTORE_DONE
        self._clear_marker(marker)
        try:
            result = await self._launch(sandbox, args, done=marker)
            if result.returncode != 0:
                raise DriverError(
                    f"cannot resume sandbox {sandbox.sandbox_id}: {proc.tail(self.log_path(sandbox), 1500)}"
                )
            await self.wait_ready(sandbox)
        except BaseException:
            # Stay suspended (the image is kept), so a later resume can try again.
            await self._stop_container(sandbox)
            self._clear_marker(marker)
            raise
        # The image and the markers stay until the record says running (resume(), adopt()).

    # ------------------------------------------------------------------ after a crash

    def _launcher_running(self, pid: int) -> bool:
        """Is pid a launcher of ours (a checkpoint or restore a killed server left behind)?"""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.runsc_root).encode() in cmdline  # a zombie's is empty

    async def _wait_helper(self, marker: Path) -> None:
        """Wait (bounded) for the checkpoint or restore whose marker this is, if it still runs."""
        try:
            pid = int(marker.with_name(marker.name + ".pid").read_text())
        except (OSError, ValueError):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HELPER_WAIT_SECONDS
        if self._launcher_running(pid):
            log.info("waiting for the %s a stopped server left running (pid %d)", marker.stem, pid)
        while self._launcher_running(pid) and loop.time() < deadline:
            await asyncio.sleep(0.1)

    async def _answers(self, sandbox: Sandbox) -> bool:
        try:
            await agent_client.control(self.agent_address(sandbox), "STATUS", timeout=5.0)
        except (OSError, TimeoutError, DriverError):
            return False
        return True

    async def _settle_suspend(self, sandbox: Sandbox, *, wait: bool = True) -> None:
        """A record left "suspending": keep a complete suspend image (suspended on disk), drop an
        incomplete one; then the sandbox is suspended in memory if frozen, else running if it
        answers, else stopped (the record says running: the caller finds it dead)."""
        record = record_of(sandbox)
        marker = sandbox.state_dir / CHECKPOINT_DONE
        if wait:
            await self._wait_helper(marker)
        image = sandbox.state_dir / SUSPEND_IMAGE
        if record.suspended_in == "disk" and marker.is_file() and (image / "checkpoint.img").is_file():
            await self._stop_container(sandbox)  # the sandbox exits after a checkpoint; runsc's record goes
            self._mark(sandbox, "suspended", "disk")
            return
        log.info("sandbox %s: dropping an incomplete suspend", sandbox.sandbox_id)
        await asyncio.to_thread(shutil.rmtree, image, True)
        self._clear_marker(marker)
        cgroup = self.cgroup_of(sandbox)
        if cgroup.pids() and cgroup.is_frozen():
            self._mark(sandbox, "suspended", "memory")
            return
        if cgroup.pids() and not await self._answers(sandbox):
            # Left half-checkpointed: of no use, and a suspend or resume of it would only fail.
            log.warning("sandbox %s does not answer after an interrupted suspend", sandbox.sandbox_id)
            await self._stop_container(sandbox)
        self._mark(sandbox, "running", "")  # adopt() finds a stopped one gone

    async def _settle_resume(self, sandbox: Sandbox) -> None:
        """A record left "resuming": running if the restore finished (or the thaw happened), else
        suspended, on disk or in memory, as before."""
        record = record_of(sandbox)
        cgroup = self.cgroup_of(sandbox)
        if record.suspended_in == "memory":
            frozen = bool(cgroup.pids()) and cgroup.is_frozen()
            self._mark(sandbox, "suspended" if frozen else "running", "memory" if frozen else "")
            return
        marker = sandbox.state_dir / RESTORE_DONE
        await self._wait_helper(marker)
        if marker.is_file() and cgroup.pids() and not cgroup.is_frozen() and await self._answers(sandbox):
            self._mark(sandbox, "running", "")
            await self._drop_suspend_image(sandbox)
            return
        log.info("sandbox %s: an unfinished resume; it stays suspended", sandbox.sandbox_id)
        await self._stop_container(sandbox)
        self._clear_marker(marker)
        self._mark(sandbox, "suspended", "disk")

    async def adopt(self, sandbox_id: str) -> Sandbox | None:
        sandbox = self.load(sandbox_id)
        if sandbox is None:
            return None
        async with self.lock(sandbox_id):
            record = record_of(sandbox)
            if record.state in ("starting", "warm"):
                await self.drop_unfinished(sandbox)
                return None
            if record.state == "suspending":
                await self._settle_suspend(sandbox)
            elif record.state == "resuming":
                await self._settle_resume(sandbox)
            cgroup = self.cgroup_of(sandbox)
            if record.state == "suspended" and record.suspended_in == "disk":
                if not (sandbox.state_dir / SUSPEND_IMAGE / "checkpoint.img").is_file():
                    return None
                return await self._with_current_egress_rules(sandbox)
            if record.state == "suspended" and cgroup.pids() and cgroup.is_frozen():
                self._schedule_disk_tier(sandbox)
                return await self._with_current_egress_rules(sandbox)
            if record.state == "running" and cgroup.pids() and not cgroup.is_frozen():
                await self._drop_suspend_image(sandbox)  # left by a crash right after a resume
                return await self._with_current_egress_rules(sandbox)
            return None

    async def _with_current_egress_rules(self, sandbox: Sandbox) -> Sandbox:
        """An adopted sandbox's uplink keeps the table an earlier server wrote: rewrite it, so that
        this server's allowed networks (and firewall rules) hold for it as for new sandboxes."""
        record = record_of(sandbox)
        if record.uplink < 0:
            return sandbox
        try:
            await egress.refresh(record.uplink, self.egress_allow)
        except DriverError as error:
            # Fail closed: a sandbox whose rules cannot be brought up to date keeps no egress.
            log.error("sandbox %s: %s; its egress is cut", sandbox.sandbox_id, error)
            await egress.remove(record.uplink)
            record.uplink = -1
            self.save(sandbox)
        return sandbox

    # ------------------------------------------------------------------ teardown and recovery

    def _teardown_binary(self, sandbox: Sandbox) -> tuple[Runsc, str]:
        """The sandbox's runsc, or the default one when that is gone (any runsc can delete a
        container whose processes the cgroup has already killed)."""
        try:
            return self.binary_of(sandbox)
        except DriverError:
            return self.default_binary

    async def _delete_container(self, container: str, binaries: list[tuple[Runsc, str]]) -> None:
        """`runsc delete -force`, with each binary in turn until runsc's record of it is gone."""
        result = None
        for binary in binaries:
            if container not in self._containers():
                return
            result = await self._runsc(["delete", "-force", container], binary=binary, timeout=60)
        if container in self._containers():
            words = result.describe() if result is not None else "no runsc to delete it with"
            raise DriverError(f"runsc could not delete container {container}: {words}")

    async def teardown(self, sandbox: Sandbox, host: names.HostNames) -> None:
        self._cancel_disk_tier(sandbox.sandbox_id)
        await self.cgroup_for(host).kill_all()
        await self._delete_container(host.container, [self._teardown_binary(sandbox)])
        if "record" in sandbox.extra and record_of(sandbox).uplink >= 0:
            await egress.remove(record_of(sandbox).uplink)

    async def remove_orphans(self, keep_keys: set[str]) -> None:
        def stray(peer_netns: str) -> bool:
            key = names.key_of_netns(self.scope, peer_netns)
            return key is not None and key not in keep_keys

        await egress.sweep(stray)
        others = [r for r in runsc_binaries.installed([self.cache_dir]) if r.path != self.runsc.path]
        binaries = [self.default_binary, *((r, r.default_platform) for r in others)]
        for container in sorted(self._containers()):
            key = names.key_of_container(container)
            if key is not None and key not in keep_keys:
                log.info("removing stray runsc container %s", container)
                await self.cgroup_for(names.host_names(self.scope, key)).kill_all()
                await self._delete_container(container, binaries)

    async def close(self) -> None:
        for sandbox_id in list(self._disk_timers):
            self._cancel_disk_tier(sandbox_id)
        await self.pool.close()
        await super().close()
