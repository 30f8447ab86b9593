"""One version's tree as data: every entry's path, type, owner, mode, times, xattrs, links, content hash.

A manifest is the whole truth about a fetched tree, and it may come from a damaged or hostile
store, so from_json() refuses anything a build could not have produced before fetch acts on it:
paths that are absolute, contain '..' or '.', repeat, or hang below anything but a directory the
manifest itself declares earlier (so no entry can be reached through a symlink, and the tree
cannot reach outside the directory it is made in); xattrs outside the namespaces an image uses;
hard-link groups mixing different files. The JSON is canonical (sorted keys, no spaces, entries in
path order), so identical trees give identical manifests and the same manifest hash.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from openmicrovm.idmap import MAX_ID

from .errors import ObjectStoreError
from .location import is_sha256

FORMAT = 1
ROOT = "."
DIR, FILE, SYMLINK, FIFO, CHAR, BLOCK, SOCKET = "dir", "file", "symlink", "fifo", "char", "block", "socket"
TYPES = (DIR, FILE, SYMLINK, FIFO, CHAR, BLOCK, SOCKET)
# What an image's files carry: user attributes, file capabilities, POSIX ACLs. Overlay's trusted.*
# keys would change what an overlay mount shows (redirects, opaque dirs) and SELinux labels
# belong to the host that set them: neither is published, and a manifest holding one is refused.
XATTR_NAMES = ("security.capability", "system.posix_acl_access", "system.posix_acl_default")
XATTR_PREFIXES = ("user.",)
MAX_XATTR_BYTES = 65536
# Device nodes an image may hold: the character devices every container runtime provides anyway
# (null, zero, full, random, urandom, tty, console, ptmx; debootstrap puts them in /dev) and
# overlay's whiteout (0, 0). Any other device in a tree on a host disk would be a way out of a
# sandbox; builds run in a user namespace and cannot make one, so a manifest with one is refused.
HARMLESS_CHAR_DEVICES = frozenset({(0, 0), (1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2)})
MAX_PATH = 4095
MAX_NAME = 255


def xattr_published(name: str) -> bool:
    return name in XATTR_NAMES or name.startswith(XATTR_PREFIXES)


class ManifestInvalid(ObjectStoreError):
    pass


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the tree, "/"-separated; "." is the tree's own directory
    type: str
    mode: int  # permission bits with setuid, setgid and sticky (0o7777)
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0  # file: its bytes
    sha256: str = ""  # file: the blob holding its bytes
    target: str = ""  # symlink: what it points at (never followed by fetch)
    link_group: int = -1  # >= 0: hard links to one inode share a group; the first one is made
    xattrs: Mapping[str, str] = field(default_factory=dict)  # name -> base64 value
    rdev: tuple[int, int] | None = None  # char and block devices: (major, minor)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "path": self.path,
            "type": self.type,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "mtime_ns": self.mtime_ns,
        }
        # Optional fields only where set: the base tree alone has thousands of entries.
        if self.type == FILE:
            data["size"] = self.size
            data["sha256"] = self.sha256
        if self.type == SYMLINK:
            data["target"] = self.target
        if self.link_group >= 0:
            data["link_group"] = self.link_group
        if self.xattrs:
            data["xattrs"] = dict(self.xattrs)
        if self.rdev is not None:
            data["rdev"] = list(self.rdev)
        return data

    def xattr_values(self) -> dict[str, bytes]:
        return {name: base64.b64decode(value) for name, value in self.xattrs.items()}


@dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...]

    def to_json(self) -> bytes:
        document = {"format": FORMAT, "entries": [entry.to_dict() for entry in self.entries]}
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

    def blobs(self) -> dict[str, int]:
        """Every blob the tree needs: sha256 -> size."""
        return {entry.sha256: entry.size for entry in self.entries if entry.type == FILE}

    @classmethod
    def from_json(cls, data: bytes, name: str) -> Manifest:
        try:
            document = json.loads(data)
        except ValueError as error:
            raise ManifestInvalid(f"manifest {name} is not JSON: {error}") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ManifestInvalid(f"manifest {name} is not a format {FORMAT} manifest")
        raw_entries = document.get("entries")
        if not isinstance(raw_entries, list) or not raw_entries:
            raise ManifestInvalid(f"manifest {name} has no entries")
        try:
            entries = tuple(_entry(raw) for raw in raw_entries)
            check_tree(entries)
        except ManifestInvalid as error:
            raise ManifestInvalid(f"manifest {name} is refused: {error}") from None
        return cls(entries)


def sort_key(path: str) -> tuple[str, ...]:
    """Path order by components: a directory before everything below it, siblings by name."""
    return () if path == ROOT else tuple(path.split("/"))


def check_tree(entries: Iterable[Entry]) -> None:
    """The checks that make a manifest safe to materialise (see the module's docstring)."""
    kinds: dict[str, str] = {}
    groups: dict[int, Entry] = {}
    blob_sizes: dict[str, int] = {}
    for entry in entries:
        if not kinds:
            if entry.path != ROOT or entry.type != DIR:
                raise ManifestInvalid("its first entry must be the tree's own directory '.'")
        else:
            _check_path(entry.path)
            if entry.path in kinds:
                raise ManifestInvalid(f"{entry.path!r} appears twice")
            parent = entry.path.rpartition("/")[0] or ROOT
            if kinds.get(parent) != DIR:
                raise ManifestInvalid(
                    f"{entry.path!r} is not below a directory declared before it ({parent!r} is "
                    f"{kinds.get(parent, 'missing')})"
                )
        kinds[entry.path] = entry.type
        if entry.type == FILE and blob_sizes.setdefault(entry.sha256, entry.size) != entry.size:
            raise ManifestInvalid(f"{entry.path!r}: blob {entry.sha256} is given two different sizes")
        if entry.link_group >= 0:
            if entry.type == DIR:
                raise ManifestInvalid(f"{entry.path!r}: a directory cannot be a hard link")
            first = groups.setdefault(entry.link_group, entry)
            if (first.type, first.sha256, first.target, first.rdev) != (
                entry.type,
                entry.sha256,
                entry.target,
                entry.rdev,
            ):
                raise ManifestInvalid(
                    f"{entry.path!r} is in hard-link group {entry.link_group} with a different file"
                )


def _check_path(path: str) -> None:
    if not path or len(path) > MAX_PATH or "\x00" in path or path.startswith("/"):
        raise ManifestInvalid(f"{path!r} is not a relative path")
    for part in path.split("/"):
        if part in ("", ".", "..") or len(os.fsencode(part)) > MAX_NAME:
            raise ManifestInvalid(f"{path!r} has an empty, '.', '..' or overlong component")


def _int(raw: Mapping[str, Any], key: str, low: int, high: int, default: int | None = None) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ManifestInvalid(f"{raw.get('path')!r}: {key} {value!r} is not an integer in {low}..{high}")
    return value


def _str(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str):
        raise ManifestInvalid(f"{raw.get('path')!r}: {key} is not a string")
    return value


def _entry(raw: Any) -> Entry:
    if not isinstance(raw, dict):
        raise ManifestInvalid("an entry is not an object")
    path, kind = _str(raw, "path"), _str(raw, "type")
    if kind not in TYPES:
        raise ManifestInvalid(f"{path!r}: unknown type {kind!r}")
    size, sha256, target, rdev = 0, "", "", None
    if kind == FILE:
        size = _int(raw, "size", 0, 2**63 - 1)
        sha256 = _str(raw, "sha256")
        if not is_sha256(sha256):
            raise ManifestInvalid(f"{path!r}: sha256 {sha256!r} is not 64 lowercase hex digits")
    if kind == SYMLINK:
        target = _str(raw, "target")
        if not target or "\x00" in target or len(target) > MAX_PATH:
            raise ManifestInvalid(f"{path!r}: the symlink target is empty, too long or has a NUL")
    if kind in (CHAR, BLOCK):
        pair = raw.get("rdev")
        if not isinstance(pair, list) or len(pair) != 2:
            raise ManifestInvalid(f"{path!r}: a device needs rdev [major, minor]")
        rdev = (
            _int({"path": path, "v": pair[0]}, "v", 0, 4095),
            _int({"path": path, "v": pair[1]}, "v", 0, 2**20 - 1),
        )
        if kind == BLOCK or rdev not in HARMLESS_CHAR_DEVICES:
            raise ManifestInvalid(
                f"{path!r}: the {kind} device {rdev[0]}:{rdev[1]} is not one an image may hold"
            )
    return Entry(
        path=path,
        type=kind,
        mode=_int(raw, "mode", 0, 0o7777),
        uid=_int(raw, "uid", 0, MAX_ID),
        gid=_int(raw, "gid", 0, MAX_ID),
        mtime_ns=_int(raw, "mtime_ns", -(2**63), 2**63 - 1),
        size=size,
        sha256=sha256,
        target=target,
        link_group=_int(raw, "link_group", -1, 2**31, default=-1),
        xattrs=_xattrs(path, raw.get("xattrs", {})),
        rdev=rdev,
    )


def _xattrs(path: str, raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ManifestInvalid(f"{path!r}: xattrs is not an object")
    for name, value in raw.items():
        if not xattr_published(name):
            raise ManifestInvalid(f"{path!r}: the xattr {name!r} is not one an image may carry")
        try:
            decoded = base64.b64decode(value, validate=True) if isinstance(value, str) else None
        except (binascii.Error, ValueError):
            decoded = None
        if decoded is None or len(decoded) > MAX_XATTR_BYTES:
            raise ManifestInvalid(
                f"{path!r}: the xattr {name!r} is not base64 of at most {MAX_XATTR_BYTES} bytes"
            )
    return dict(raw)
