"""Files of trees this host fetched before, found by content hash, so that a host running its
second version of an image downloads only that version's own files, not the Debian base again.

A file whose owner, mode, xattrs and mtime are the new entry's too is hard-linked (trees are
read-only to every driver, as the build host's exported root filesystems are), which also stores
the shared base once per host; any other is copied. Either way its bytes are hashed first: a
cached tree is only trusted as far as it still matches its manifest.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

from .cache import MANIFESTS_DIR, tree_path
from .errors import ObjectStoreError
from .files import copy_verified, hashes_to
from .manifest import FILE, Entry, Manifest

log = logging.getLogger(__name__)

# Trees looked at for reuse, most recently fetched first: each costs a manifest parse (a few tens
# of ms for a Debian tree), and the base files are in every one of them.
RECENT_TREES = 4


def _same_metadata(entry: Entry, other: Entry) -> bool:
    return (entry.mode, entry.uid, entry.gid, entry.mtime_ns, dict(entry.xattrs)) == (
        other.mode,
        other.uid,
        other.gid,
        other.mtime_ns,
        dict(other.xattrs),
    )


def _on_disk_as(path: Path, entry: Entry) -> bool:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISREG(info.st_mode)
        and stat.S_IMODE(info.st_mode) == entry.mode
        and (info.st_uid, info.st_gid, info.st_mtime_ns, info.st_size)
        == (entry.uid, entry.gid, entry.mtime_ns, entry.size)
    )


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


class LocalFiles:
    """For one fetch (not shared between fetches: it remembers what this one linked)."""

    def __init__(self, files: dict[str, list[tuple[Path, Entry]]]) -> None:
        self._files = files
        # Inodes already linked into the tree being made: two files that were distinct in the
        # published tree must stay distinct (their own inodes, link counts) in the fetched one.
        self._linked: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    @classmethod
    def in_cache(cls, cache_root: Path, recent: int = RECENT_TREES) -> LocalFiles:
        copies = []
        for copy in (cache_root / MANIFESTS_DIR).glob("*.json"):
            tree = tree_path(cache_root, copy.stem)
            if tree.is_dir():
                copies.append((copy.stat().st_mtime_ns, copy, tree))
        files: dict[str, list[tuple[Path, Entry]]] = {}
        for _, copy, tree in sorted(copies, reverse=True)[:recent]:
            try:
                manifest = Manifest.from_json(copy.read_bytes(), str(copy))
            except (OSError, ObjectStoreError) as error:
                log.warning("not reusing files of %s: %s", tree, error)
                continue
            for entry in manifest.entries:
                if entry.type == FILE:
                    files.setdefault(entry.sha256, []).append((tree / entry.path, entry))
        return cls(files)

    def link_identical(self, entry: Entry, destination: Path) -> bool:
        for path, cached in self._files.get(entry.sha256, ()):
            if not (_same_metadata(entry, cached) and _on_disk_as(path, entry)):
                continue
            inode = _inode(path)
            with self._lock:
                if inode is None or inode in self._linked:
                    continue
                self._linked.add(inode)
            if not hashes_to(path, entry.sha256, entry.size):
                continue
            try:
                os.link(path, destination, follow_symlinks=False)
            except OSError:  # too many links to one inode (ext4: 65000), another file system
                continue
            return True
        return False

    def copy(self, entry: Entry, destination: Path) -> bool:
        return any(
            copy_verified(path, destination, entry.sha256, entry.size)
            for path, _ in self._files.get(entry.sha256, ())
        )
