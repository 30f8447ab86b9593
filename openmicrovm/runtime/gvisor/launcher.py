"""The launcher: a shell around every runsc command, in a private mount namespace of its own.

It hides /proc/sys/net under an empty tmpfs: runsc (2022 and 2024 alike) decides "am I in the root
network namespace?" by looking for /proc/sys/net/core/rmem_default, which newer kernels show in
every namespace, and would refuse --network=sandbox.

For run and restore (in the sandbox's cgroups already: the shim joined them) it first mounts the
sandbox's root (SandboxRoot): a kernel overlay of the image under a throwaway tmpfs, with the
host's resolvers in its /etc/resolv.conf when the host has reachable ones ($OMV_RESOLV, written to
the root's throwaway upper layer, never to the image; the link is removed first so that a symlink
in the image cannot point the write at a host file). With $OMV_IDMAP set (an image owned by shifted
host ids, SandboxSpec.rootfs_id_base) the overlay's lower layer is an idmapped mount of the image
that shows those files with container ids (omv-idmap, agent/idmap.c); the overlay is then nosuid
and nodev too, since through it an image's setuid file now looks owned by host root, and the host
kernel would honour it (gVisor applies setuid bits itself, from the mode bits, and runs no host
binary from the image). The mounts live in the launcher's private mount namespace, which runsc's
processes inherit, so the host never sees them and they vanish with the sandbox.

With $OMV_DONE set it stays to write its pid to $OMV_DONE.pid first and the marker $OMV_DONE once
the command succeeded (crash safety, see recovery.py).

The writable layer is runsc's in-memory overlay (--overlay2=root:memory) over that root: a
checkpoint carries it. (runsc 2022 also offers a file-backed overlay, --overlay2=root:<dir>, but
its checkpoint fails with "encoding error at object tmpfs.filesystem"; measured 2026-11. runsc
2024's default, root:self, would put the overlay's file into the sandbox root, a 1 MiB tmpfs here.)
Files the app writes therefore count against its memory limit.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from openmicrovm.hostnet.dns import resolv_conf
from openmicrovm.idmap import ID_COUNT, id_base_problem

from .. import agent_build
from ..driver import DriverError, SandboxSpec
from ..records import write_private
from ..rootfs import overlay_safe

SCRIPT = (
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


@functools.cache
def _tools() -> tuple[str, str]:
    """unshare and sh, looked up once: every runsc command (each restore, checkpoint, delete) runs
    through wrap()."""
    return shutil.which("unshare") or "unshare", shutil.which("sh") or "/bin/sh"


def wrap(argv: list[str]) -> list[str]:
    """argv run by the launcher, in a private mount namespace."""
    unshare, shell = _tools()
    return [unshare, "-m", "--propagation", "private", shell, "-c", SCRIPT, "omv-runsc", *argv]


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class SandboxRoot:
    """Where and how the launcher mounts a sandbox's root."""

    def __init__(self, state_root: Path, cache_dir: Path) -> None:
        self.state_root = state_root
        self.cache_dir = cache_dir
        # One path for every sandbox, in its own mount namespace: a checkpoint and every restore of
        # it see the same root path.
        self.mount_point = state_root / "mnt" / "root"
        self.stub = state_root / "mnt" / "stub"
        for path in (self.mount_point, self.stub):
            path.mkdir(parents=True, exist_ok=True)

    async def options(self, spec: SandboxSpec) -> dict[str, str]:
        """The launcher's environment for mounting spec's root. runsc creates mount points
        (/.omv/agent, and /proc, /dev, /sys where an image lacks them) in the root it is given,
        before its own in-memory overlay applies; the tmpfs upper layer keeps those writes off the
        image.

        An image owned by shifted host ids (rootfs_id_base) is shown through an idmapped mount with
        container ids, at every run and every restore alike: a checkpoint records the files' ids
        as the app saw them, so a restore must see the same ones."""
        options = {
            "OMV_STUB": str(self.stub),
            "OMV_IMAGE": overlay_safe(spec.rootfs.resolve()),
            "OMV_ROOT": str(self.mount_point),
            "OMV_RESOLV": self.resolver_file(),
        }
        id_base = spec.rootfs_id_base
        if id_base:
            problem = id_base_problem(id_base)
            if problem is not None:
                raise DriverError(problem)
            tool = await agent_build.ensure_idmap(self.cache_dir)
            options.update(OMV_IDMAP=str(tool), OMV_ID_BASE=str(id_base), OMV_ID_COUNT=str(ID_COUNT))
        return options

    def resolver_file(self) -> str:
        """A resolv.conf with the host's resolvers that a sandbox with egress can reach (as a
        build's, see hostnet/dns.py), or "" when the host has none. Read afresh at
        every run and restore: the host's resolvers may change while snapshots stay."""
        text, servers = resolv_conf("a MicroVM")
        if not servers:
            return ""
        path = self.state_root / "resolv.conf"
        if _read_text(path) != text:
            write_private(path, text)  # the launcher, which reads it, runs as root
        return str(path)
