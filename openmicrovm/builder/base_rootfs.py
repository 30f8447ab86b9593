"""The local stand-in for the managed base image: a Debian root filesystem made with debootstrap.

AWS builds on Amazon Linux 2023; we cannot pull it offline, so the managed base `al2023-1` and the
container base `public.ecr.aws/lambda/microvms:al2023-minimal` are both backed by this Debian
bookworm minbase with python3 and ca-certificates. It is made once (about a minute), then cached
and shared by every data dir on the machine.
"""

from __future__ import annotations

import asyncio
import fcntl
import shutil
from collections.abc import Callable
from pathlib import Path

from openmicrovm.private_files import private_dir

SUITE = "bookworm"
PACKAGES = ("python3", "ca-certificates")
ROOTFS_NAME = f"debian-{SUITE}-minbase-python3"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

Progress = Callable[[str], None]


class BaseRootfsError(Exception):
    pass


def _mirror(chosen: str) -> str:
    """`chosen` (the setting debian_mirror), else the mirror this host's apt uses, so that a
    machine that reaches only its own mirror works."""
    if chosen:
        return chosen
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                uri = line.split(":", 1)[1].strip().split()[0]
                if not uri.rstrip("/").endswith("security"):
                    return uri
    return DEFAULT_MIRROR


def rootfs_path(cache_dir: Path) -> Path:
    return cache_dir / "base" / ROOTFS_NAME


def _marker(cache_dir: Path) -> Path:
    # Kept beside the rootfs, not inside it, so it never ends up in an image.
    return cache_dir / "base" / f"{ROOTFS_NAME}.complete"


def is_ready(cache_dir: Path) -> bool:
    return _marker(cache_dir).exists() and rootfs_path(cache_dir).is_dir()


def _run_debootstrap(target: Path, progress: Progress, mirror: str) -> None:
    import subprocess

    if shutil.which("debootstrap") is None:
        raise BaseRootfsError("debootstrap is not installed: apt-get install debootstrap")
    cmd = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(target),
        _mirror(mirror),
    ]
    progress(f"building the base root filesystem: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-19:], line]
        # debootstrap prints "I: Retrieving ...", "I: Extracting ...", "I: Configuring ..." per package.
        if line.startswith(("I: Retrieving", "I: Validating", "I: Extracting", "I: Configuring", "I: Base")):
            progress(line[3:])
    if proc.wait() != 0:
        raise BaseRootfsError("debootstrap failed:\n" + "\n".join(tail))


def ensure_base_rootfs(cache_dir: Path, progress: Progress | None = None, mirror: str = "") -> Path:
    """Return the cached base rootfs, building it first if needed (from `mirror`, see _mirror).
    Safe across processes: a lock file serialises builders, and the rootfs only appears under its
    final name once complete."""
    report = progress or (lambda _message: None)
    final = rootfs_path(cache_dir)
    if is_ready(cache_dir):
        return final
    # Without a server (tests, benches, the CLI) this may be the first to make the cache dir.
    private_dir(cache_dir, "cache dir")
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{ROOTFS_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(cache_dir):
            return final
        scratch = final.parent / f"{ROOTFS_NAME}.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        _marker(cache_dir).unlink(missing_ok=True)
        try:
            _run_debootstrap(scratch, report, mirror)
            # apt caches are not part of an image; dropping them saves ~30 MB per copy.
            shutil.rmtree(scratch / "var/cache/apt/archives", ignore_errors=True)
            (scratch / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
            scratch.rename(final)
            _marker(cache_dir).write_text("ok\n")
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        report("base root filesystem ready")
        return final


async def ensure_base_rootfs_async(
    cache_dir: Path, progress: Progress | None = None, mirror: str = ""
) -> Path:
    return await asyncio.to_thread(ensure_base_rootfs, cache_dir, progress, mirror)
