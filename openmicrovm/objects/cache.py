"""A host's cache of fetched trees: where each lives, the lock that makes one fetch of each, and
the flush that makes a tree durable before it appears.

    <cache root>/<manifest sha256>/            a complete tree (only ever appears by rename)
    <cache root>/.<manifest sha256>.partial/   one being made, by the holder of its lock
    <cache root>/.locks/<manifest sha256>.lock
    <cache root>/manifests/<sha256>.json       the checked manifest of each tree, for reuse

The cache root is private (0700): trees keep their setuid files and device nodes, and only the
runtime has any business reading them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from openmicrovm.private_files import private_dir

LOCKS_DIR = ".locks"
MANIFESTS_DIR = "manifests"


def tree_path(cache_root: Path, sha256: str) -> Path:
    return cache_root / sha256


def partial_path(cache_root: Path, sha256: str) -> Path:
    return cache_root / f".{sha256}.partial"


def lock_path(cache_root: Path, sha256: str) -> Path:
    return cache_root / LOCKS_DIR / f"{sha256}.lock"


def manifest_copy_path(cache_root: Path, sha256: str) -> Path:
    return cache_root / MANIFESTS_DIR / f"{sha256}.json"


def prepare(cache_root: Path) -> None:
    private_dir(cache_root, "object cache")
    for name in (LOCKS_DIR, MANIFESTS_DIR):
        (cache_root / name).mkdir(mode=0o700, exist_ok=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive across processes and threads alike: flock belongs to the open file, and each
    caller opens its own. Released by the kernel if the holder dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _syncfs(fd: int) -> bool:
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    return hasattr(libc, "syncfs") and libc.syncfs(fd) == 0


def make_durable(path: Path) -> None:
    """Flush every file just written below `path` before it is renamed into place: after a crash a
    tree is either absent or whole, never present with empty files (thousands of files make one
    syncfs of their file system far cheaper than an fsync each)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not _syncfs(fd):
            os.sync()
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
