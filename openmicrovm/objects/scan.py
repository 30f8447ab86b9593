"""Reading a version's outputs directory into a Manifest, hashing every regular file once.

Nothing is followed: symlinks are recorded as links, hard links inside the tree become a link
group (a root filesystem also shares inodes with the build cache outside it; those are plain
files here, since only links inside the tree are part of the image).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import ObjectStoreError
from .manifest import (
    BLOCK,
    CHAR,
    DIR,
    FIFO,
    FILE,
    ROOT,
    SOCKET,
    SYMLINK,
    Entry,
    Manifest,
    sort_key,
    xattr_published,
)
from .transfer import run_all


@dataclass(frozen=True)
class ScannedTree:
    manifest: Manifest
    sources: dict[str, Path]  # sha256 -> one file of the tree holding those bytes


def _walk(root: Path) -> list[tuple[str, os.stat_result]]:
    found = [(ROOT, os.lstat(root))]
    pending = [(root, "")]
    while pending:
        directory, relative = pending.pop()
        with os.scandir(directory) as listing:
            for item in listing:
                path = f"{relative}{item.name}"
                info = item.stat(follow_symlinks=False)
                found.append((path, info))
                if stat.S_ISDIR(info.st_mode):
                    pending.append((Path(item.path), f"{path}/"))
    return found


def _kind(path: str, mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, DIR),
        (stat.S_ISREG, FILE),
        (stat.S_ISLNK, SYMLINK),
        (stat.S_ISFIFO, FIFO),
        (stat.S_ISCHR, CHAR),
        (stat.S_ISBLK, BLOCK),
        (stat.S_ISSOCK, SOCKET),
    ):
        if test(mode):
            return kind
    raise ObjectStoreError(f"{path}: a file of unknown type ({mode:o}) cannot be published")


def _xattrs(path: Path) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    values = {}
    for name in sorted(names):
        if xattr_published(name):
            value = os.getxattr(path, name, follow_symlinks=False)
            values[name] = base64.b64encode(value).decode()
    return values


def _sha256(path: Path) -> str:
    with open(path, "rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


def scan_tree(root: Path, workers: int) -> ScannedTree:
    """The manifest of everything below `root` (which must be a directory)."""
    if not root.is_dir() or root.is_symlink():
        raise ObjectStoreError(f"{root} is not a directory of build outputs")
    found = sorted(_walk(root), key=lambda item: sort_key(item[0]))
    inode_paths: dict[tuple[int, int], list[str]] = {}
    for path, info in found:
        if not stat.S_ISDIR(info.st_mode) and info.st_nlink > 1:
            inode_paths.setdefault((info.st_dev, info.st_ino), []).append(path)
    groups: dict[tuple[int, int], int] = {}
    for inode, paths in inode_paths.items():
        if len(paths) > 1:
            groups[inode] = len(groups)
    # One hash per inode: hard links are read once.
    to_hash: dict[tuple[int, int], str] = {}
    for path, info in found:
        if stat.S_ISREG(info.st_mode):
            to_hash.setdefault((info.st_dev, info.st_ino), path)
    hashes = dict(
        zip(to_hash, run_all(lambda path: _sha256(root / path), to_hash.values(), workers), strict=True)
    )
    entries = []
    sources: dict[str, Path] = {}
    for path, info in found:
        inode = (info.st_dev, info.st_ino)
        kind = _kind(path, info.st_mode)
        full = root if path == ROOT else root / path
        sha256 = hashes.get(inode, "") if kind == FILE else ""
        if sha256:
            sources.setdefault(sha256, full)
        entries.append(
            Entry(
                path=path,
                type=kind,
                mode=stat.S_IMODE(info.st_mode),
                uid=info.st_uid,
                gid=info.st_gid,
                mtime_ns=info.st_mtime_ns,
                size=info.st_size if kind == FILE else 0,
                sha256=sha256,
                target=os.readlink(full) if kind == SYMLINK else "",
                link_group=groups.get(inode, -1),
                xattrs=_xattrs(full),
                rdev=(os.major(info.st_rdev), os.minor(info.st_rdev)) if kind in (CHAR, BLOCK) else None,
            )
        )
    return ScannedTree(Manifest(tuple(entries)), sources)
