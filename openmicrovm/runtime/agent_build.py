"""Building the small C helpers: the guest agent (agent/agent.c and its sibling files, around
agent/protocol.h), the host shim (agent/shim.c) and the idmapped-mount tool (agent/idmap.c, which
mounts image root filesystems with their owners shifted; Debian 12's mount(8) cannot).

All are static binaries, so the agent runs in any image whatever its libc. Each is cached under
<cache_dir>/<name>/<hash of its sources and flags>/<binary>, so a change to any file it is built
from gets a new path and snapshots made with an older agent keep theirs.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import TextIO

from . import proc
from .driver import DriverError

COMPILER_FLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror")
AGENT = "agent"
SHIM = "shim"
IDMAP = "idmap"
_BINARY_NAMES = {AGENT: "omv-agent", SHIM: "omv-shim", IDMAP: "omv-idmap"}
# Every file in agent/ each helper is built from: its .c files and the headers they include. The
# build sees only these (it copies them to a directory of its own), so a file missing here fails
# the build instead of escaping the cache hash.
SOURCE_FILES = {
    AGENT: ("agent.c", "wire.c", "app.c", "relay.c", "pty.c", "agent.h", "protocol.h"),
    SHIM: ("shim.c",),
    IDMAP: ("idmap.c",),
}


def source_files(name: str = AGENT) -> dict[str, bytes]:
    """The helper's files by name, as packaged."""
    folder = resources.files("openmicrovm.runtime").joinpath("agent")
    return {file: folder.joinpath(file).read_bytes() for file in SOURCE_FILES[name]}


def source(name: str = AGENT) -> bytes:
    """Everything the helper is built from, as one byte string (what its cache path hashes)."""
    return _joined(source_files(name))


def binary_path(cache_dir: Path, name: str = AGENT) -> Path:
    return _binary_path(cache_dir, name, source_files(name))


def _joined(files: dict[str, bytes]) -> bytes:
    """A one-file helper's file as it is, so that the shim's and idmap's cache paths stay what they
    were; several files each as its name, its length and its bytes, so that no two different sets
    of files join to the same string."""
    if len(files) == 1:
        return next(iter(files.values()))
    return b"".join(f"{file}\0{len(data)}\0".encode() + data for file, data in files.items())


def _binary_path(cache_dir: Path, name: str, files: dict[str, bytes]) -> Path:
    digest = hashlib.sha256(_joined(files) + " ".join(COMPILER_FLAGS).encode()).hexdigest()[:16]
    return cache_dir / name / digest / _BINARY_NAMES[name]


def compiler() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


async def ensure_agent(cache_dir: Path) -> Path:
    return await ensure_binary(cache_dir, AGENT)


async def ensure_shim(cache_dir: Path) -> Path:
    return await ensure_binary(cache_dir, SHIM)


async def shim_prefix(cache_dir: Path, join: list[Path], wait: bool) -> list[str]:
    """omv-shim's argv up to the command it runs (see agent/shim.c): wait for the command's exit
    status or not; first move into the cgroups whose cgroup.procs files `join` lists."""
    shim = await ensure_shim(cache_dir)
    joins = [option for path in join for option in ("--join", str(path))]
    return [str(shim), *(["--wait"] if wait else []), *joins, "--"]


async def ensure_idmap(cache_dir: Path) -> Path:
    return await ensure_binary(cache_dir, IDMAP)


async def ensure_binary(cache_dir: Path, name: str) -> Path:
    """The binary, compiled on first use. A file lock serialises builders, across processes and
    across tasks alike (each task locks its own open file, taken in a thread)."""
    files = source_files(name)  # read once: the binary is built from exactly what its path hashes
    target = _binary_path(cache_dir, name, files)
    if target.is_file():
        return target
    cc = compiler()
    if cc is None:
        raise DriverError("openmicrovm needs a C compiler for its helpers: apt-get install gcc libc6-dev")
    target.parent.mkdir(parents=True, exist_ok=True)
    file_lock = await asyncio.to_thread(_lock, target.parent / ".lock")
    try:
        if target.is_file():
            return target
        work = target.parent / f".build-{os.getpid()}"
        work.mkdir(exist_ok=True)
        try:
            for file, data in files.items():
                (work / file).write_bytes(data)
            units = [str(work / file) for file in files if file.endswith(".c")]
            result = await proc.run(
                [cc, *COMPILER_FLAGS, "-o", str(work / target.name), *units],
                check=False,
                timeout=120,
            )
            if result.returncode != 0:
                raise DriverError(
                    f"cannot build {target.name} (static glibc is in libc6-dev): {result.describe()}"
                )
            # rename() makes the binary appear complete or not at all.
            os.rename(work / target.name, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        file_lock.close()
    return target


def _lock(path: Path) -> TextIO:
    handle = open(path, "w")  # the caller closes it to release the lock
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle
