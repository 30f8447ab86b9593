"""Where buildah runs: a user namespace whose root is not host root, inside a root of our making.

Every buildah command runs here (`python -m openmicrovm.builder.build_jail SPEC -- buildah ...`),
because buildah itself can be fooled by a Dockerfile into mounting a path of its choosing into a
RUN step (CVE-2024-9675: a cache mount `id` with `..`; CVE-2024-1753: a bind mount that follows a
stage's symlink), and Debian 12's buildah 1.28 has neither fix. Two walls, each enough alone for
the known tricks:

1. **No host filesystem to name.** The launcher, still host root, makes a private mount namespace
   whose root is a fresh tmpfs holding only what buildah needs: the host's /usr read-only, a
   generated /etc (passwd, group, hosts, the build's resolv.conf) with the container and CA
   configuration read-only, a minimal /dev, a fresh /proc of a new PID namespace, and the build
   storage, its run dir and temp dir. It pivots into that root and detaches the old one, so a
   path that climbs out of buildah's cache dir ends in the tmpfs, not in the host's `/`.
2. **Container root is not host root.** Then it enters a new user namespace mapping container ids
   0..65535 to host ids openmicrovm.idmap.ID_BASE.., and a mount namespace owned by it, which locks
   every mount above (read-only stays read-only, nothing can be unmounted to reveal what is
   under it). buildah and every RUN step act as an unprivileged host id: no file of the host's
   can be written or read beyond what any user may, no device node can be made, and the setuid
   bits and file capabilities a layer carries mean nothing to the host.

The storage, run dir and temp dir are owned by the mapped root (prepare_owned_dir). The launcher
stays as the parent of the namespace's init (buildah, or a shell for multi-step work) and passes
SIGTERM and SIGINT on; if the launcher dies, the kernel kills the init (PR_SET_PDEATHSIG), and the
PID namespace with it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from openmicrovm.idmap import ID_BASE, ID_COUNT, uid_map_line

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
SYS_PIVOT_ROOT = 155  # x86_64 and aarch64 differ: see _pivot_root
# Where the pieces appear inside the jail.
STORAGE = "/storage"
RUNROOT = "/run/buildah"
TMPDIR = "/var/tmp"
# Device nodes a build may use, bound from the host's (a user namespace cannot mknod).
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# Host /etc entries a build reads: container policy and registries, CA certificates, name service.
_ETC_BINDS = ("containers", "ssl", "ca-certificates", "ca-certificates.conf", "nsswitch.conf", "localtime")
_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"
_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"

_libc = ctypes.CDLL(None, use_errno=True)


class JailError(Exception):
    pass


@dataclass(frozen=True)
class Bind:
    source: str  # host path
    target: str  # path inside the jail
    writable: bool = False


@dataclass(frozen=True)
class JailSpec:
    storage: str  # host dir of buildah's graph root, owned by the mapped root
    runroot: str  # host dir of buildah's volatile state, shared by every buildah of this storage
    tmpdir: str  # host dir for buildah's temporary files (pulled blobs, cache mounts)
    netns: str | None = None  # a network namespace to join; None: a new, empty one
    resolv_conf: str | None = None  # host file shown as /etc/resolv.conf
    binds: list[Bind] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    id_base: int = ID_BASE
    # cgroup.procs files the launcher joins first, so that buildah and every RUN step are limited
    # and killed with the build's cgroup (see SandboxDriver.job_cgroup); none: the caller's cgroup.
    cgroup_procs: list[str] = field(default_factory=list)

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: str) -> JailSpec:
        data = json.loads(text)
        data["binds"] = [Bind(**bind) for bind in data.get("binds", [])]
        return cls(**data)


def command(spec: JailSpec, argv: list[str]) -> list[str]:
    """The command line that runs `argv` in the jail described by `spec`."""
    return [sys.executable, "-m", "openmicrovm.builder.build_jail", spec.encode(), "--", *argv]


def prepare_owned_dir(path: Path, id_base: int = ID_BASE) -> Path:
    """Create `path` (and parents) owned by the jail's root, mode 0700; returns it."""
    path.mkdir(parents=True, exist_ok=True)
    status = path.stat()
    if (status.st_uid, status.st_gid) != (id_base, id_base):
        os.chown(path, id_base, id_base)
    os.chmod(path, 0o700)
    return path


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(error)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encoded = [value.encode() if value is not None else None for value in (source, target, fstype, data)]
    _check(
        _libc.mount(encoded[0], encoded[1], encoded[2], ctypes.c_ulong(flags), encoded[3]), f"mount {target}"
    )


def _bind(source: str, target: str, writable: bool, *, executable: bool = True) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV
    if not writable:
        flags |= MS_RDONLY
    if not executable:
        flags |= MS_NOEXEC
    _mount(None, target, None, flags)


def _unshare(flags: int, what: str) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare ({what})")


def _pivot_root(new_root: str, put_old: str) -> None:
    number = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, SYS_PIVOT_ROOT)
    _check(_libc.syscall(ctypes.c_long(number), new_root.encode(), put_old.encode()), "pivot_root")


def _make_target(path: str, like: str) -> None:
    if os.path.isdir(like):
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            open(path, "w").close()


class _HostPaths:
    """Host paths opened (O_PATH) before the jail's tmpfs is mounted over some directory, which
    might hide one of them; later they are named through /proc/self/fd."""

    def __init__(self) -> None:
        self.opened: dict[str, str] = {}

    def open(self, path: str) -> str:
        if path not in self.opened:
            descriptor = os.open(path, os.O_PATH | os.O_CLOEXEC)
            self.opened[path] = f"/proc/self/fd/{descriptor}"
        return self.opened[path]


def _host_paths(spec: JailSpec) -> _HostPaths:
    paths = _HostPaths()
    wanted = ["/usr", *(f"/dev/{name}" for name in _DEVICES), spec.storage, spec.runroot, spec.tmpdir]
    wanted += [f"/{name}" for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
               if os.path.isdir(f"/{name}") and not os.path.islink(f"/{name}")]  # fmt: skip
    wanted += [os.path.realpath(f"/etc/{name}") for name in _ETC_BINDS if os.path.exists(f"/etc/{name}")]
    wanted += [bind.source for bind in spec.binds]
    if spec.resolv_conf:
        wanted.append(spec.resolv_conf)
    for path in wanted:
        paths.open(path)
    return paths


def _populate(root: str, spec: JailSpec, host: _HostPaths) -> None:
    """Lay out the jail's root at `root` (a fresh tmpfs), still as host root."""
    for name in ("usr", "etc", "dev", "proc", "sys", "tmp", "var/tmp", "run", "root", ".old"):
        os.makedirs(f"{root}/{name}", exist_ok=True)
    # buildah keeps lock files under /run (libpod); the run root proper is bound below.
    _mount(
        "openmicrovm-build-run",
        f"{root}/run",
        "tmpfs",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        f"mode=755,size=16m,uid={spec.id_base},gid={spec.id_base}",
    )
    _bind(host.open("/usr"), f"{root}/usr", writable=False)
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.islink(f"/{name}"):
            os.symlink(os.readlink(f"/{name}"), f"{root}/{name}")
        elif os.path.isdir(f"/{name}"):  # a host without merged /usr
            os.makedirs(f"{root}/{name}")
            _bind(host.open(f"/{name}"), f"{root}/{name}", writable=False)
    for name in _ETC_BINDS:
        if os.path.exists(f"/etc/{name}"):
            source = os.path.realpath(f"/etc/{name}")
            _make_target(f"{root}/etc/{name}", host.open(source))
            _bind(host.open(source), f"{root}/etc/{name}", writable=False, executable=False)
    for name, text in (("passwd", _PASSWD), ("group", _GROUP), ("hosts", _HOSTS), ("hostname", "build\n")):
        Path(f"{root}/etc/{name}").write_text(text)
    if spec.resolv_conf:
        _make_target(f"{root}/etc/resolv.conf", host.open(spec.resolv_conf))
        _bind(host.open(spec.resolv_conf), f"{root}/etc/resolv.conf", writable=False, executable=False)
    _mount("openmicrovm-build-tmp", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=256m")
    _populate_dev(f"{root}/dev", host)
    _mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("sysfs", f"{root}/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    binds = [
        Bind(spec.storage, STORAGE, True),
        Bind(spec.runroot, RUNROOT, True),
        Bind(spec.tmpdir, TMPDIR, True),
        *spec.binds,
    ]
    for bind in binds:
        target = f"{root}{bind.target}"
        _make_target(target, host.open(bind.source))
        # The storage must stay executable (RUN steps run from its layers); the rest need not.
        _bind(host.open(bind.source), target, bind.writable, executable=bind.target == STORAGE)


def _populate_dev(dev: str, host: _HostPaths) -> None:
    _mount("openmicrovm-build-dev", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")
    for name in _DEVICES:
        open(f"{dev}/{name}", "w").close()
        _mount(host.open(f"/dev/{name}"), f"{dev}/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):  # fmt: skip
        os.symlink(target, f"{dev}/{name}")
    for name in ("pts", "shm", "mqueue"):
        os.makedirs(f"{dev}/{name}")
    _mount("openmicrovm-devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC,
           "newinstance,ptmxmode=0666,mode=0620")  # fmt: skip
    _mount("openmicrovm-shm", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=64m")
    try:
        _mount("mqueue", f"{dev}/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except JailError:
        os.rmdir(f"{dev}/mqueue")


def _enter_user_namespace(id_base: int) -> None:
    """Become root of a new user namespace mapping 0..ID_COUNT-1 to id_base.. on the host.

    Only a process of the parent namespace may write such a map, so a helper forked beforehand
    (still host root) writes it once this process has unshared."""
    unshared_r, unshared_w = os.pipe()
    me = os.getpid()
    helper = os.fork()
    if helper == 0:
        os.close(unshared_w)
        code = 1
        try:
            if os.read(unshared_r, 1) == b"u":
                for name in ("uid_map", "gid_map"):
                    with open(f"/proc/{me}/{name}", "w") as handle:
                        handle.write(uid_map_line(id_base, ID_COUNT))
                code = 0
        except OSError as error:
            print(f"build jail: writing the user namespace's id map failed: {error}", file=sys.stderr)
        os._exit(code)
    os.close(unshared_r)
    try:
        _unshare(CLONE_NEWUSER, "user")
    finally:
        os.write(unshared_w, b"u")
        os.close(unshared_w)
    _, status = os.waitpid(helper, 0)
    if status != 0:
        raise JailError("the user namespace could not be given its id map")
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _init(spec: JailSpec, argv: list[str]) -> None:
    """The namespace's first process: build the jail, drop to the mapped root, exec argv."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    host = _host_paths(spec)
    root = "/tmp"  # any existing dir: the tmpfs over it is seen only in this mount namespace
    _mount("openmicrovm-build-root", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=16m")
    _populate(root, spec, host)
    os.chdir(root)
    _pivot_root(".", ".old")
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "detaching the host's root")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _enter_user_namespace(spec.id_base)
    # A mount namespace owned by the new user namespace: the mounts above become locked.
    _unshare(CLONE_NEWNS, "mount")
    environment = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "TMPDIR": TMPDIR,
        **spec.environment,
    }
    os.execvpe(argv[0], argv, environment)


def run(spec: JailSpec, argv: list[str]) -> int:
    for procs in spec.cgroup_procs:
        with open(procs, "w") as joining:
            joining.write(str(os.getpid()))
    if spec.netns:
        with open(spec.netns) as netns:
            _check(_libc.setns(netns.fileno(), CLONE_NEWNET), "joining the build's network namespace")
        fresh_net = 0
    else:
        fresh_net = CLONE_NEWNET
    _unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | fresh_net, "mount, pid, ipc, uts")
    child = os.fork()
    if child == 0:
        try:
            _init(spec, argv)
        except (JailError, OSError) as error:
            print(f"build jail: {error}", file=sys.stderr)
        os._exit(125)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    return os.waitstatus_to_exitcode(status) if status else 0


def main() -> None:
    arguments = sys.argv[1:]
    if len(arguments) < 3 or arguments[1] != "--":
        sys.exit("usage: python -m openmicrovm.builder.build_jail SPEC_JSON -- COMMAND [ARG...]")
    code = run(JailSpec.decode(arguments[0]), arguments[2:])
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
