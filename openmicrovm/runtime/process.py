"""The process driver: bubblewrap in namespaces of its own, limited by cgroups and a seccomp filter.

The fallback where gVisor is missing. Weaker than gvisor, and it says so (make_driver logs a
WARNING when it falls back to it):
  * isolation is Linux namespaces, a user namespace, a seccomp filter and a reduced capability
    set, not a separate kernel: the app's system calls (all but the filtered ones) reach the host's
    kernel, so a kernel bug they can reach is a way out;
  * there is no memory snapshot (CRIU is the only tool for that and it fails on our kernels): a
    "snapshot" is the sandbox's writable filesystem layer plus its spec, so restore() cold-starts
    the app on a copy of that layer, and suspend() freezes the cgroup, keeping RAM resident;
  * no internet egress, and additionalOsCapabilities ALL is refused (start/restore say why).

Per sandbox:
  * a user namespace mapping container ids 0..ID_COUNT-1 to host ids ID_BASE.. (openmicrovm.idmap):
    the app's root is host uid ID_BASE, owns nothing on the host and holds its capabilities only
    over the namespaces made inside it. The driver makes the namespace with a short-lived "holder"
    process (`unshare --user`) and writes its maps from outside (a process may not map more than
    its own id into its own namespace); the launcher enters it with nsenter as container root and
    execs bwrap there, so bwrap and everything below it run as host id ID_BASE.
  * a network namespace with only `lo`, made (and owned) by the host: the app cannot configure it,
    whatever its capabilities. The driver opens sockets inside it (see netns.py), so it reaches
    the app on 127.0.0.1 directly; nothing else is in there, so the sandbox reaches neither the
    host nor other sandboxes. Ports below 1024 are opened to every user there, since the app's
    CAP_NET_BIND_SERVICE counts only in its own user namespace.
  * an overlayfs: the image read-only below, <state dir>/upper above. It is mounted inside a
    private mount namespace of the sandbox's launcher, under a tmpfs at STAGE_DIR (a path every
    user can traverse: bwrap, as host id ID_BASE, cannot walk the data dir), so it never appears
    in the host's mount table and disappears with the sandbox's last process. An image owned by
    plain ids (rootfs_id_base 0, made before builds ran in a user namespace) is shown through an
    idmapped mount (omv-idmap) so that its files appear with the app's ids. The writable layer is
    always owned by shifted ids (ID_BASE + N): what the app writes is stored as its host id.
  * cgroups (memory, cpu, pids, freezer; and on cgroup v1 the devices controller, which allows
    only the character devices of a minimal /dev), joined by the launcher before anything else
    runs. Not delegated: the app sees no cgroupfs and cannot change its limits.
  * a minimal /dev (null, zero, full, random, urandom, tty, a devpts, a 1777 tmpfs at /dev/shm):
    bwrap binds these from the host; no other device node exists, and mknod of a real device
    needs CAP_MKNOD in the host's user namespace, which the app never has.
  * a seccomp filter (seccomp.py, Docker's default profile as the model) on the agent and the app.
  * the guest agent as PID 1 of a new PID namespace (bwrap --as-pid-1), listening on
    127.0.0.1:AGENT_PORT for status and terminal sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import socket
import stat
from pathlib import Path

from .. import idmap
from ..private_files import write_private_file
from . import agent_build, cgroups, names, netns, oci, proc, rootfs, seccomp
from .agent_client import AGENT_PORT, AgentAddress
from .base import BaseDriver, log
from .driver import (
    DriverCapabilities,
    DriverError,
    PortNotListening,
    Sandbox,
    SandboxSpec,
    SnapshotError,
    SnapshotInfo,
)
from .options import DriverOptions
from .records import (
    SNAPSHOT_FILE,
    SandboxRecord,
    SnapshotMeta,
    discard_snapshot_contents,
    prepare_snapshot_dir,
    read_snapshot_meta,
    write_private,
)
from .rootfs import overlay_safe

LAYER = "upper"  # the writable layer, in a state dir and in a snapshot
# In a snapshot: says the layer is owned by shifted ids (ID_BASE + N). Snapshots made before the
# driver had a user namespace lack it; their layer, owned by plain ids, is shifted on restore.
LAYER_IDS_FILE = "upper-id-base"
SECCOMP_FILE = "seccomp.bpf"
# An empty host directory that every launcher mounts its own tmpfs on, in its private mount
# namespace; the sandbox root and the agent are mounted below it there. On the host it stays empty.
STAGE_DIR = Path("/run/openmicrovm-sandbox-root")
REFUSED_ALL_CAPABILITIES = (
    "the process driver cannot contain an app with every capability (additionalOsCapabilities ALL "
    "includes CAP_SYS_ADMIN, CAP_SYS_MODULE and CAP_MKNOD, and this driver runs apps on the host's "
    "kernel); use the gvisor driver for such images"
)
# The devices cgroup (v1): read and write only these character devices, create none.
DEVICE_RULES = (
    "c 1:3 rw",  # null
    "c 1:5 rw",  # zero
    "c 1:7 rw",  # full
    "c 1:8 rw",  # random
    "c 1:9 rw",  # urandom
    "c 5:0 rw",  # tty
    "c 5:2 rw",  # ptmx
    "c 136:* rw",  # pseudo-terminals (devpts)
)

# Runs in the sandbox's cgroups (the shim joins them first). $1 the stage dir, $2 omv-idmap ("":
# the image needs no shift), $3 the image, $4 the shift "FROM TO COUNT", $5 overlay
# upperdir/workdir options, $6 the agent binary, $7 the seccomp program, $8 netns path, $9 pid of
# the user namespace's holder; then bwrap and its args. Tools are absolute paths (the launcher's
# PATH is the app's); bwrap finds the seccomp program on fd 3 and closes it.
_LAUNCHER = """\
stage="$1"
{mount} -t tmpfs -o mode=0755,size=64k omv-stage "$stage" || exit 125
{mkdir} "$stage/root" "$stage/lower" && : > "$stage/agent" || exit 125
lower="$3"
if [ -n "$2" ]; then "$2" "$3" "$stage/lower" $4 || exit 125; lower="$stage/lower"; fi
{mount} -t overlay omv-layer -o "lowerdir=$lower,$5" "$stage/root" || exit 125
{mount} --bind "$6" "$stage/agent" || exit 125
exec 3< "$7" || exit 125
netns="$8"; userns="/proc/$9/ns/user"; shift 9
exec {nsenter} --net="$netns" --user="$userns" --setuid 0 --setgid 0 -- "$@"
"""


def _open_low_ports() -> None:
    """In the sandbox's network namespace (a thread inside it, netns.call_in_namespace): let any
    user bind ports below 1024 and open ICMP echo sockets, as Docker does in containers. The app's
    CAP_NET_BIND_SERVICE and CAP_NET_RAW are its user namespace's, and this namespace is the host's."""
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", "w") as handle:
        handle.write("0")
    with open("/proc/sys/net/ipv4/ping_group_range", "w") as handle:
        handle.write(f"{idmap.ID_BASE} {idmap.ID_BASE + idmap.ID_COUNT - 1}")


def shift_layer_ids(root: Path) -> int:
    """Give every entry under root (root included) owned by a plain container id N the host id
    ID_BASE + N, as the sandbox's user namespace needs; ids already shifted stay. chown clears
    setuid/setgid bits, so the mode is set again. Returns how many entries changed."""
    changed = 0
    paths = [str(root)]
    for directory, dirs, files in os.walk(root):
        paths += [os.path.join(directory, name) for name in dirs + files]
    for path in paths:
        info = os.lstat(path)
        uid = info.st_uid + idmap.ID_BASE if info.st_uid < idmap.ID_COUNT else -1
        gid = info.st_gid + idmap.ID_BASE if info.st_gid < idmap.ID_COUNT else -1
        if uid == -1 and gid == -1:
            continue
        os.lchown(path, uid, gid)
        if not stat.S_ISLNK(info.st_mode):
            os.chmod(path, stat.S_IMODE(info.st_mode))
        changed += 1
    return changed


def _overlayfs_supported() -> bool:
    try:
        return "overlay" in Path("/proc/filesystems").read_text()
    except OSError:
        return False


class ProcessDriver(BaseDriver[SandboxRecord]):
    name = "process"
    record_type = SandboxRecord
    capabilities = DriverCapabilities(memory_snapshot=False, suspend_releases_memory=False)
    cold_start_footprint_bytes = 32 * 1024 * 1024

    # What an operator loses with the process driver: said with the fallback to it (a WARNING).
    fallback_limits = (
        "isolates less than gVisor: apps run on the host's kernel behind Linux namespaces, a user "
        "namespace, a seccomp filter and a reduced capability set, instead of on gVisor's own kernel, "
        "so a bug in the host kernel's system calls is a way out; has no memory snapshots (every "
        "restore cold-starts the app on its files, losing what it held in memory, and suspend keeps "
        "the memory resident); gives MicroVMs no internet egress; and refuses "
        "additionalOsCapabilities ALL. Install runsc (apt-get install runsc, or `openmicrovm doctor`) "
        "for the gvisor driver"
    )

    @classmethod
    def host_problems(cls, options: DriverOptions, cache_dir: Path | None) -> list[str]:
        problems = super().host_problems(options, cache_dir)
        if shutil.which("bwrap") is None:
            problems.append("bwrap (apt-get install bubblewrap)")
        if not _overlayfs_supported():
            problems.append("overlayfs in the kernel")
        return problems

    def __init__(self, state_root: Path, cache_dir: Path, options: DriverOptions | None = None) -> None:
        super().__init__(state_root, cache_dir, options)
        tools = {}
        for tool in ("bwrap", "unshare", "nsenter", "sh", "mount", "mkdir"):
            found = shutil.which(tool)
            if found is None:
                raise DriverError(f"the process driver needs {tool} (bubblewrap / util-linux / coreutils)")
            tools[tool] = found
        self.tools = tools
        # Fails here, not at the first start, on an architecture the filter does not cover.
        self.seccomp_program = seccomp.program()
        # On cgroup v2 the devices controller does not exist (device rules are BPF programs there):
        # the user namespace and the minimal /dev are then what keeps devices out of reach.
        self.devices_mount = cgroups.v1_controller_mount("devices") if self.layout.version == 1 else None

    # ------------------------------------------------------------------ pieces

    def namespaces(self, host: names.HostNames) -> list[str]:
        return [host.netns]

    def agent_address(self, sandbox: Sandbox) -> AgentAddress:
        name = self.names_of(sandbox).netns

        async def open_socket() -> socket.socket:
            return await netns.connect(name, "127.0.0.1", AGENT_PORT, timeout=5.0)

        return AgentAddress(open_socket, self.record(sandbox).token)

    def check_spec(self, spec: SandboxSpec) -> rootfs.ResolvedUser:
        """What start() and restore() refuse before making anything, beyond every driver's checks:
        every capability (the API refuses it earlier, service/image_config.py; this covers
        versions built before), ids the user namespace does not map, an id base without room for
        the range."""
        user = super().check_spec(spec)
        if spec.all_capabilities:
            raise DriverError(REFUSED_ALL_CAPABILITIES)
        outside = [i for i in (user.uid, user.gid, *user.groups) if not 0 <= i < idmap.ID_COUNT]
        if outside:
            raise DriverError(
                f"user {spec.process.user!r} has ids {outside} outside the 0..{idmap.ID_COUNT - 1} "
                "that the sandbox's user namespace maps"
            )
        problem = idmap.id_base_problem(spec.rootfs_id_base)
        if problem is not None:
            raise DriverError(problem)
        return user

    def _device_cgroup(self, host: names.HostNames) -> list[Path]:
        """The sandbox's devices cgroup (cgroup v1), set to allow only DEVICE_RULES; its
        cgroup.procs file for the shim to join, or nothing where there is no such controller.
        Cgroup.remove() removes it with the others (it removes the path in every hierarchy)."""
        if self.devices_mount is None:
            return []
        path = self.devices_mount / host.cgroup
        path.mkdir(parents=True, exist_ok=True)
        try:
            (path / "devices.deny").write_text("a")
            for rule in DEVICE_RULES:
                (path / "devices.allow").write_text(rule)
        except OSError as error:
            raise DriverError(f"cannot set the device rules of cgroup {path}: {error.strerror}") from None
        return [path / "cgroup.procs"]

    def _prepare_layer(self, sandbox: Sandbox, fresh: bool) -> None:
        """The writable layer and overlay's work dir. The root of the merged tree takes its owner and
        mode from the layer's root: a fresh one gets the image root's, shifted to the host id the
        app's user namespace gives it (made by host root, it would show as "nobody" and the app's
        root could not write to /)."""
        spec = sandbox.spec
        upper, work = sandbox.state_dir / LAYER, sandbox.state_dir / "work"
        upper.mkdir(exist_ok=True)
        work.mkdir(exist_ok=True)
        if fresh:
            image_root = spec.rootfs.resolve().stat()
            uid, gid = image_root.st_uid - spec.rootfs_id_base, image_root.st_gid - spec.rootfs_id_base
            os.chown(
                upper,
                idmap.ID_BASE + (uid if 0 <= uid < idmap.ID_COUNT else 0),
                idmap.ID_BASE + (gid if 0 <= gid < idmap.ID_COUNT else 0),
            )
            os.chmod(upper, stat.S_IMODE(image_root.st_mode))

    async def _start_userns_holder(self) -> asyncio.subprocess.Process:
        """A process in a new user namespace whose uid and gid maps are idmap's range; the launcher
        enters its namespace (by /proc/<pid>/ns/user) while the holder lives. The holder says
        "ready" once unshare has happened and waits for its stdin to close."""
        holder = await asyncio.create_subprocess_exec(
            self.tools["unshare"],
            "--user",
            "--",
            self.tools["sh"],
            "-c",
            "echo ready; read _",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            assert holder.stdout is not None
            line = await asyncio.wait_for(holder.stdout.readline(), 30)
            if line != b"ready\n":
                assert holder.stderr is not None
                error = (await asyncio.wait_for(holder.stderr.read(), 5)).decode(errors="replace").strip()
                raise DriverError(f"cannot create a user namespace for the sandbox: {error or 'no output'}")
            for name in ("uid_map", "gid_map"):
                try:
                    Path(f"/proc/{holder.pid}/{name}").write_text(idmap.uid_map_line())
                except OSError as error:
                    raise DriverError(
                        f"cannot map ids {idmap.ID_BASE}.. in the sandbox's user namespace ({name}): "
                        f"{error.strerror}"
                    ) from None
        except BaseException:
            await self._end_userns_holder(holder)
            raise
        return holder

    @staticmethod
    async def _end_userns_holder(holder: asyncio.subprocess.Process) -> None:
        if holder.stdin is not None:
            holder.stdin.close()
        try:
            await asyncio.wait_for(holder.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                holder.kill()
            await holder.wait()

    def _bwrap_argv(self, sandbox: Sandbox) -> list[str]:
        spec = sandbox.spec
        user = rootfs.resolve_user(spec.rootfs, spec.process.user)
        argv = [
            self.tools["bwrap"],
            # No --unshare-user: the launcher already runs bwrap inside the sandbox's user
            # namespace (bwrap would map one id only), so the namespaces below belong to it.
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            spec.hostname,
            "--bind",
            str(STAGE_DIR / "root"),
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--perms",
            "1777",
            "--tmpfs",
            "/dev/shm",
            "--ro-bind",
            str(STAGE_DIR / "agent"),
            oci.AGENT_IN_SANDBOX,
            "--seccomp",
            "3",
            "--chdir",
            "/",
            "--as-pid-1",
            "--new-session",
            "--cap-drop",
            "ALL",
        ]
        # Capabilities of the sandbox's user namespace: they act on what it owns, never the host.
        for cap in oci.capability_set(False):
            argv += ["--cap-add", cap]
        return [*argv, "--", *oci.agent_command(f"127.0.0.1:{AGENT_PORT}", user, spec.process)]

    async def boot(self, sandbox: Sandbox, agent: Path) -> None:
        await self._cold_start(sandbox, agent, self.exit_grace, fresh=True)

    async def _cold_start(self, sandbox: Sandbox, agent: Path, grace: float, *, fresh: bool) -> None:
        """Cold-start the sandbox on the writable layer in its state dir (fresh: an empty one)."""
        spec = sandbox.spec
        host = self.names_of(sandbox)
        cgroup = await self.create_cgroup(host, self.cgroup_limits(spec))
        join = [*cgroup.procs_files(), *self._device_cgroup(host)]
        await netns.create(host.netns)
        await netns.call_in_namespace(host.netns, _open_low_ports)
        self._prepare_layer(sandbox, fresh)
        STAGE_DIR.mkdir(mode=0o755, exist_ok=True)
        write_private_file(sandbox.state_dir / SECCOMP_FILE, self.seccomp_program)
        shift = ""
        idmap_tool = ""
        if spec.rootfs_id_base != idmap.ID_BASE:
            idmap_tool = str(await agent_build.ensure_idmap(self.cache_dir))
            shift = f"{spec.rootfs_id_base} {idmap.ID_BASE} {idmap.ID_COUNT}"
        layer_options = f"upperdir={overlay_safe(sandbox.state_dir / LAYER)},workdir={overlay_safe(sandbox.state_dir / 'work')}"
        user = rootfs.resolve_user(spec.rootfs, spec.process.user)
        # The launcher's environment reaches the agent through bwrap; the agent keeps
        # OMV_AGENT_TOKEN to itself and hands the rest to the app.
        env = rootfs.app_environment(spec.process, user)
        env["OMV_AGENT_TOKEN"] = self.record(sandbox).token
        script = _LAUNCHER.format(
            **{tool: shlex.quote(self.tools[tool]) for tool in ("mount", "mkdir", "nsenter")}
        )
        holder = await self._start_userns_holder()
        try:
            argv = [
                *await agent_build.shim_prefix(self.cache_dir, join, wait=False),
                self.tools["unshare"],
                "-m",
                "--propagation",
                "private",
                self.tools["sh"],
                "-c",
                script,
                "omv-launch",
                str(STAGE_DIR),
                idmap_tool,
                overlay_safe(spec.rootfs.resolve()),
                shift,
                layer_options,
                str(agent),
                str(sandbox.state_dir / SECCOMP_FILE),
                str(netns.path_of(host.netns)),
                str(holder.pid),
                *self._bwrap_argv(sandbox),
            ]
            result = await proc.run(
                argv, check=False, env=env, stdout_path=self.log_path(sandbox), timeout=60
            )
            if result.returncode != 0:
                raise DriverError(f"cannot start the sandbox: {proc.tail(self.log_path(sandbox))}")
            # Once the agent answers, bwrap is inside the user namespace and keeps it alive.
            await self.wait_ready(sandbox, grace=grace)
        finally:
            await self._end_userns_holder(holder)

    # ------------------------------------------------------------------ lifecycle

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
                (snapshot_dir / LAYER_IDS_FILE).write_text(f"{idmap.ID_BASE}\n")
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
        await self.unless_stray(sandbox_id)
        with self.creating(sandbox_id):
            return await self._restore(sandbox_id, snapshot_dir)

    async def _restore(self, sandbox_id: str, snapshot_dir: Path) -> Sandbox:
        meta = read_snapshot_meta(snapshot_dir, self.name)
        layer = snapshot_dir / LAYER
        if not layer.is_dir():
            raise SnapshotError(f"snapshot {snapshot_dir} is incomplete: the {LAYER} layer is missing")
        self.check_spec(meta.spec)
        self.gate.check(
            "restore a sandbox",
            max(meta.footprint_bytes, self.cold_start_footprint_bytes),
            meta.spec.memory_mib,
        )
        agent = await agent_build.ensure_agent(self.cache_dir)
        # No memory to carry over, so each restore gets its own agent secret.
        sandbox = self.new_sandbox(sandbox_id, meta.spec, self.new_token(), agent)
        async with self.destroyed_on_failure(sandbox):
            result = await proc.run(
                ["cp", "-a", "--reflink=auto", str(layer), str(sandbox.state_dir / LAYER)],
                check=False,
                timeout=600,
            )
            if result.returncode != 0:
                raise SnapshotError(
                    f"cannot copy the filesystem layer of snapshot {snapshot_dir}: {result.describe()}"
                )
            if not (snapshot_dir / LAYER_IDS_FILE).is_file():
                # Made before sandboxes had a user namespace: the layer has plain container ids.
                changed = await asyncio.to_thread(shift_layer_ids, sandbox.state_dir / LAYER)
                log.info(
                    "restore of %s: shifted the ids of %d files of an older snapshot", sandbox_id, changed
                )
            await self._cold_start(sandbox, agent, 0.0, fresh=False)
            self.record(sandbox).state = "running"
            self.save(sandbox)
        return sandbox

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
            record = self.record(sandbox)
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
