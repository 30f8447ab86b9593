"""Making a tree from a checked manifest inside a fresh, private directory.

Only the manifest decides what is made, and Manifest.from_json has already refused any path that
could leave the directory: every parent is a directory this module made itself, so nothing is
ever created through a symlink. Links are made with follow_symlinks=False and files with O_EXCL |
O_NOFOLLOW, so a symlink in the tree (even one pointing at /etc) is only ever an entry, never a
way through. Ownership and modes are applied last and in the order the kernel needs: chown first
(it clears setuid bits and file capabilities), then chmod, then xattrs, then times; directories
deepest first, since making anything inside one changes its mtime.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol

from .files import copy_verified
from .manifest import BLOCK, CHAR, DIR, FIFO, FILE, ROOT, SOCKET, SYMLINK, Entry, Manifest
from .transfer import run_all


class BlobSource(Protocol):
    def link_identical(self, entry: Entry, destination: Path) -> bool:
        """Make `destination` a hard link to a local file with the entry's bytes, owner, mode,
        xattrs and times, if there is one. Such a file must then not be touched (other trees
        share its inode)."""
        ...

    def write(self, entry: Entry, destination: Path) -> None:
        """Write the entry's bytes, checked against its sha256, to the new file `destination`."""
        ...


def _path(root: Path, entry: Entry) -> Path:
    return root if entry.path == ROOT else root / entry.path


def apply_metadata(path: Path, entry: Entry) -> None:
    os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
    if entry.type != SYMLINK:  # Linux symlinks have no mode of their own
        os.chmod(path, entry.mode, follow_symlinks=False)
    for name, value in entry.xattr_values().items():
        os.setxattr(path, name, value, follow_symlinks=False)
    os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)


def _make_special(path: Path, entry: Entry) -> None:
    if entry.type == SYMLINK:
        os.symlink(entry.target, path)
    elif entry.type == FIFO:
        os.mkfifo(path, 0o600)
    elif entry.type == SOCKET:
        os.mknod(path, stat.S_IFSOCK | 0o600)
    elif entry.type in (CHAR, BLOCK) and entry.rdev is not None:
        kind = stat.S_IFCHR if entry.type == CHAR else stat.S_IFBLK
        os.mknod(path, kind | 0o600, os.makedev(*entry.rdev))


def build_tree(manifest: Manifest, root: Path, blobs: BlobSource, workers: int) -> None:
    """Everything but the directories' own metadata (seal_directories does that, last)."""
    firsts: dict[int, Entry] = {}  # link group -> the member made; the others link to it
    by_blob: dict[str, list[Entry]] = {}
    for entry in manifest.entries[1:]:
        path = root / entry.path
        if entry.type == DIR:
            os.mkdir(path, 0o700)
        elif entry.link_group >= 0 and entry.link_group in firsts:
            continue
        else:
            if entry.link_group >= 0:
                firsts[entry.link_group] = entry
            if entry.type == FILE:
                by_blob.setdefault(entry.sha256, []).append(entry)
            else:
                _make_special(path, entry)

    def fill(entries: list[Entry]) -> list[Entry]:
        """One blob's files: each linked to an identical local file if there is one, else copied
        from one already made here, else written from the blob source: one download per blob."""
        shared = []
        made: Path | None = None
        for entry in entries:
            destination = root / entry.path
            if blobs.link_identical(entry, destination):
                shared.append(entry)
            elif made is None or not copy_verified(made, destination, entry.sha256, entry.size):
                blobs.write(entry, destination)
            made = made or destination
        return shared

    shared = {entry.path for group in run_all(fill, list(by_blob.values()), workers) for entry in group}
    for entry in manifest.entries[1:]:
        if entry.type == DIR or entry.path in shared:
            continue
        path = root / entry.path
        first = firsts.get(entry.link_group)
        if first is not None and first is not entry:
            os.link(root / first.path, path, follow_symlinks=False)
        else:
            apply_metadata(path, entry)


def seal_directories(manifest: Manifest, root: Path) -> None:
    for entry in reversed(manifest.entries):
        if entry.type == DIR:
            apply_metadata(_path(root, entry), entry)
