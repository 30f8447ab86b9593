"""Unpacking a code artifact zip into a build context, safely.

The zip comes from a user, so every entry is checked before anything is written: no absolute
paths, no `..`, no device files, FIFOs or sockets, no symlink or hard link that resolves outside
the context (following chains of links the way the kernel would), nothing written through a
link, and no more files or bytes than the configured limits, where bytes are counted as they are
decompressed rather than taken from the headers (zip bombs lie there). Everything is created
below the context directory only; any violation is ARCHIVE_INVALID naming the entry.
"""

from __future__ import annotations

import errno
import lzma
import os
import stat
import struct
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from openmicrovm.builder.cleanup import Aborted, in_thread
from openmicrovm.builder.errors import (
    ARCHIVE_DOCKERFILE_NOT_FOUND,
    ARCHIVE_INVALID,
    BuildFailed,
    disk_full,
    is_disk_full,
)

DOCKERFILE = "Dockerfile"
_CHUNK = 1024 * 1024
_MAX_LINK_TARGET = 4095  # PATH_MAX less its NUL: symlink(2) refuses longer targets
_NAME_MAX = 255  # bytes in one path component (Linux NAME_MAX)
# Bytes in an entry's whole path: below PATH_MAX (4096), leaving room for the context dir's own path.
_MAX_ENTRY_PATH = 3072
_SHOWN_NAME_CHARS = 200  # longer names are shortened in messages
_MAX_LINK_HOPS = 40  # Linux's own limit on symlinks followed during one lookup
_UNIX_CREATOR = 3
_PKWARE_UNIX_EXTRA = 0x000D  # carries the "linked to" name of hard links (APPNOTE 4.5.7)
_MSDOS_DIRECTORY = 0x10


@dataclass(frozen=True)
class UnpackLimits:
    max_total_bytes: int = 2 * 1024 * 1024 * 1024
    max_files: int = 100_000


@dataclass(frozen=True)
class UnpackedContext:
    path: Path
    files: int
    total_bytes: int


@dataclass
class _Entry:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    kind: str  # "file", "dir", "symlink", "hardlink"
    mode: int  # permission bits only
    link_target: str = ""


@dataclass(slots=True, eq=False)
class _Node:
    """One path of the context as a tree, so that planning follows links and `..` in O(1) steps
    (paths as tuples cost O(depth) per step, which made deep or link-heavy zips take hours)."""

    name: str
    parent: _Node | None
    children: dict[str, _Node] = field(default_factory=dict)
    entry: _Entry | None = None  # None: a directory only implied by the entries below it
    # The shallowest ancestor that is an entry other than a directory (nothing may lie below one);
    # computed once per node.
    blocker: _Node | None = None
    blocker_known: bool = False
    # For a symlink, memoised: where its target leads (a node plus how many components past it
    # name paths the zip does not hold) and the longest chain of links that took, itself included.
    # Without the memo, links naming links several times were resolved exponentially often.
    target: tuple[_Node, int] | None = None
    link_depth: int = 0
    resolving: bool = False


@dataclass
class _Plan:
    root: _Node = field(default_factory=lambda: _Node("", None))
    entries: dict[tuple[str, ...], _Entry] = field(default_factory=dict)
    # Directories implied by entry paths, whether or not the zip lists them (filled at the end).
    directories: set[tuple[str, ...]] = field(default_factory=set)
    # Every path an entry names or implies.
    nodes: dict[tuple[str, ...], _Node] = field(default_factory=dict)
    made_directories: int = 0

    def directory(self, parts: tuple[str, ...], max_directories: int) -> _Node:
        """The node of directory `parts`, made with any missing ancestors. Looked up by the whole
        path first (entries share their directories), so an entry costs its path's length, not
        the square of its depth."""
        if not parts:
            return self.root
        node = self.nodes.get(parts)
        if node is not None:
            return node
        known = len(parts) - 1
        while known and parts[:known] not in self.nodes:
            known -= 1
        node = self.nodes[parts[:known]] if known else self.root
        for depth in range(known + 1, len(parts) + 1):
            if self.made_directories >= max_directories:
                # Each entry name can imply ~1500 directories: bound them like files.
                raise BuildFailed.because(
                    ARCHIVE_INVALID,
                    f"The code artifact zip implies more than {max_directories} directories; this "
                    f"server accepts at most {max_directories}.",
                )
            child = _Node(parts[depth - 1], node)
            node.children[child.name] = child
            node = child
            self.nodes[parts[:depth]] = node
            self.made_directories += 1
        return node


def _printable(name: str) -> str:
    # Entry names are user data going into an API response: keep them on one line, and short.
    if len(name) > _SHOWN_NAME_CHARS:
        name = f"{name[:150]}...{name[-30:]}"
    return "".join(char if char.isprintable() else "?" for char in name)


def _invalid(entry_name: str, why: str) -> BuildFailed:
    return BuildFailed.because(
        ARCHIVE_INVALID, f"The code artifact zip is not acceptable: entry '{_printable(entry_name)}' {why}."
    )


def _normalise(info: zipfile.ZipInfo) -> tuple[str, ...]:
    name = info.filename
    if "\x00" in name:
        raise _invalid(name, "contains a NUL character")
    # Zips written on Windows sometimes use backslashes; treat them as separators so that
    # "..\\x" is seen for what it is.
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) >= 2 and posix[1] == ":" and posix[0].isalpha()):
        raise _invalid(name, "has an absolute path")
    # filter() and `in` run in C: a path of many components costs no Python step per component.
    parts = tuple(filter(None, posix.split("/")))
    if "." in parts:
        parts = tuple(part for part in parts if part != ".")
    if ".." in parts:
        raise _invalid(name, "has a '..' path component that points outside the build context")
    # A character is at most 4 bytes: only names that may pass the limit are encoded to check,
    # so a deep path costs C-speed work, not a Python step per component.
    for part in parts if parts and max(map(len, parts)) * 4 > _NAME_MAX else ():
        if len(os.fsencode(part)) > _NAME_MAX:
            raise _invalid(
                name,
                f"has a file or directory name of {len(os.fsencode(part))} bytes; names are limited "
                f"to {_NAME_MAX} bytes",
            )
    if len(os.fsencode("/".join(parts))) > _MAX_ENTRY_PATH:
        raise _invalid(name, f"has a path longer than {_MAX_ENTRY_PATH} bytes")
    return parts


def _unix_mode(info: zipfile.ZipInfo) -> int:
    return (info.external_attr >> 16) & 0xFFFF if info.create_system == _UNIX_CREATOR else 0


def _hardlink_target(info: zipfile.ZipInfo) -> str | None:
    """The "linked to" name of a PKWARE Unix extra field, the one way a zip can hold a hard link."""
    extra = info.extra
    offset = 0
    while offset + 4 <= len(extra):
        header_id, size = struct.unpack_from("<HH", extra, offset)
        data = extra[offset + 4 : offset + 4 + size]
        offset += 4 + size
        if header_id == _PKWARE_UNIX_EXTRA and len(data) > 12:
            return data[12:].decode("utf-8", errors="replace")
    return None


def _classify(info: zipfile.ZipInfo, parts: tuple[str, ...]) -> _Entry:
    mode = _unix_mode(info)
    file_type = stat.S_IFMT(mode)
    is_dir = info.filename.endswith(("/", "\\")) or bool(info.external_attr & _MSDOS_DIRECTORY)
    if file_type in (stat.S_IFCHR, stat.S_IFBLK):
        raise _invalid(info.filename, "is a device file")
    if file_type == stat.S_IFIFO:
        raise _invalid(info.filename, "is a FIFO")
    if file_type == stat.S_IFSOCK:
        raise _invalid(info.filename, "is a socket")
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
        raise _invalid(info.filename, f"has an unknown file type (mode {mode:o})")
    if info.flag_bits & 0x1:
        raise _invalid(info.filename, "is encrypted")
    # Keep rwx bits only: setuid/setgid files would otherwise be created as root on the host.
    permissions = mode & 0o777
    if file_type == stat.S_IFLNK:
        return _Entry(info, parts, "symlink", 0o777)
    if file_type == stat.S_IFDIR or is_dir:
        return _Entry(info, parts, "dir", permissions or 0o755)
    hardlink = _hardlink_target(info)
    if hardlink:
        return _Entry(info, parts, "hardlink", permissions or 0o644, hardlink)
    return _Entry(info, parts, "file", permissions or 0o644)


def _read_link_target(archive: zipfile.ZipFile, entry: _Entry) -> str:
    with archive.open(entry.info) as stream:
        raw = stream.read(_MAX_LINK_TARGET + 1)
    if len(raw) > _MAX_LINK_TARGET or not raw or b"\x00" in raw:
        raise _invalid(entry.info.filename, "is a symlink with an empty, oversized or binary target")
    return raw.decode("utf-8", errors="surrogateescape")


def _check_abort(abort: threading.Event | None) -> None:
    if abort is not None and abort.is_set():
        raise Aborted("unpacking cancelled")


def _path_of(node: _Node) -> tuple[str, ...]:
    parts: list[str] = []
    while node.parent is not None:
        parts.append(node.name)
        node = node.parent
    return tuple(reversed(parts))


def _follow(start: _Node, target: str, entry_name: str, level: int = 0) -> tuple[tuple[_Node, int], int]:
    """Where `target`, seen from directory `start`, ends up once every link in the archive is
    followed, and how many levels of links that took. The place is a node plus the number of
    components past it that the zip does not hold (those hold no links, so they need no nodes).
    Raises ARCHIVE_INVALID when it leaves the context at any step."""
    if target.startswith("/"):
        raise _invalid(
            entry_name, f"links to the absolute path '{_printable(target)}', outside the build context"
        )
    node, missing = start, 0
    deepest = 0
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if missing:
                missing -= 1
            elif node.parent is None:
                raise _invalid(
                    entry_name, f"links to '{_printable(target)}', which points outside the build context"
                )
            else:
                node = node.parent
            continue
        child = node.children.get(part) if not missing else None
        if child is None:
            missing += 1
        elif child.entry is not None and child.entry.kind == "symlink":
            (node, missing), depth = _link_target(child, entry_name, level)
            deepest = max(deepest, depth)
        else:
            node = child
    return (node, missing), deepest


def _link_target(link: _Node, entry_name: str, level: int) -> tuple[tuple[_Node, int], int]:
    """Follow a symlink met at nesting `level`; each link is resolved once (memoised)."""
    assert link.entry is not None and link.parent is not None
    if link.target is None:
        if link.resolving or level >= _MAX_LINK_HOPS:
            raise _invalid(entry_name, "is part of a symlink loop")
        link.resolving = True
        link.target, deepest = _follow(link.parent, link.entry.link_target, entry_name, level + 1)
        link.resolving = False
        link.link_depth = deepest + 1
    # As the kernel: a lookup may not nest links deeper than its limit, memoised or not.
    if level + link.link_depth > _MAX_LINK_HOPS:
        raise _invalid(entry_name, "is part of a symlink loop")
    return link.target, link.link_depth


def _blocker(node: _Node) -> _Node | None:
    """The shallowest ancestor of `node` that is an entry but not a directory, if any."""
    pending: list[_Node] = []
    current: _Node | None = node
    # Iterative: a chain of ~1500 directories would pass Python's recursion limit.
    while current is not None and not current.blocker_known:
        pending.append(current)
        current = current.parent
    for item in reversed(pending):
        parent = item.parent
        if parent is None:
            item.blocker = None
        elif parent.blocker is not None:
            item.blocker = parent.blocker
        elif parent.entry is not None and parent.entry.kind != "dir":
            item.blocker = parent
        else:
            item.blocker = None
        item.blocker_known = True
    return node.blocker


def _plan(archive: zipfile.ZipFile, limits: UnpackLimits, abort: threading.Event | None = None) -> _Plan:
    infos = archive.infolist()
    if len(infos) > limits.max_files:
        raise BuildFailed.because(
            ARCHIVE_INVALID,
            f"The code artifact zip holds {len(infos)} entries; this server accepts at most "
            f"{limits.max_files}.",
        )
    plan = _Plan()
    for count, info in enumerate(infos):
        if count % 1024 == 0:
            _check_abort(abort)
        parts = _normalise(info)
        if not parts:
            continue  # an entry for the root directory itself
        entry = _classify(info, parts)
        if parts in plan.entries:
            raise _invalid(info.filename, "appears more than once")
        plan.entries[parts] = entry
        parent = plan.directory(parts[:-1], limits.max_files)
        node = parent.children.get(parts[-1])
        if node is None:
            node = _Node(parts[-1], parent)
            parent.children[node.name] = node
            plan.nodes[parts] = node
        node.entry = entry
    plan.directories = {parts for parts, node in plan.nodes.items() if node.children}
    for count, entry in enumerate(plan.entries.values()):
        if count % 1024 == 0:
            _check_abort(abort)
        # Never write through a link: an entry below a symlink entry could land anywhere.
        blocker = _blocker(plan.nodes[entry.parts])
        if blocker is not None:
            assert blocker.entry is not None
            raise _invalid(
                entry.info.filename,
                f"lies below '{_printable(blocker.entry.info.filename)}', which is not a directory",
            )
    for count, (parts, entry) in enumerate(plan.entries.items()):
        if count % 1024 == 0:
            _check_abort(abort)
        if entry.kind != "dir" and parts in plan.directories:
            raise _invalid(entry.info.filename, "is both a file and the directory of other entries")
        if entry.kind == "symlink":
            entry.link_target = _read_link_target(archive, entry)
    for count, (parts, entry) in enumerate(plan.entries.items()):
        if count % 1024 == 0:
            _check_abort(abort)
        if entry.kind == "symlink":
            _link_target(plan.nodes[parts], entry.info.filename, 0)
        elif entry.kind == "hardlink":
            (node, missing), _ = _follow(plan.root, entry.link_target.replace("\\", "/"), entry.info.filename)
            linked = node.entry if not missing else None
            if linked is None or linked.kind != "file":
                raise _invalid(
                    entry.info.filename,
                    f"is a hard link to '{_printable(entry.link_target)}', which is not a regular file in the archive",
                )
            entry.link_target = "/".join(_path_of(node))
    return plan


def _check_dockerfile(plan: _Plan) -> None:
    entry = plan.entries.get((DOCKERFILE,))
    if entry is not None and entry.kind in ("file", "hardlink"):
        return
    if entry is not None and entry.kind == "symlink":
        (node, missing), _ = _link_target(plan.nodes[(DOCKERFILE,)], entry.info.filename, 0)
        if not missing and node.entry is not None and node.entry.kind in ("file", "hardlink"):
            return
    elsewhere = sorted(
        "/".join(parts) for parts in plan.entries if parts[-1] == DOCKERFILE and len(parts) > 1
    )
    hint = (
        f" A Dockerfile was found at '{_printable(elsewhere[0])}'; move it to the root of the zip."
        if elsewhere
        else ""
    )
    raise BuildFailed.because(
        ARCHIVE_DOCKERFILE_NOT_FOUND,
        f"The code artifact zip has no file named {DOCKERFILE!r} at its root.{hint}",
    )


def _timestamp(info: zipfile.ZipInfo) -> float:
    try:
        return time.mktime((*info.date_time, 0, 0, -1))
    except (OverflowError, ValueError):
        return 0.0


class _ByteBudget:
    def __init__(self, limit: int, abort: threading.Event | None) -> None:
        self.limit = limit
        self.used = 0
        self.abort = abort

    def spend(self, amount: int, entry_name: str) -> None:
        _check_abort(self.abort)
        self.used += amount
        if self.used > self.limit:
            raise BuildFailed.because(
                ARCHIVE_INVALID,
                f"The code artifact zip expands to more than {self.limit} bytes (limit reached while "
                f"unpacking entry '{_printable(entry_name)}'); it may be a zip bomb.",
            )


def _extract_file(archive: zipfile.ZipFile, entry: _Entry, target: Path, budget: _ByteBudget) -> None:
    # O_EXCL|O_NOFOLLOW: the path was just planned as new, so anything already there is an attack.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out, archive.open(entry.info) as stream:
        while True:
            try:
                chunk = stream.read(_CHUNK)
            # bz2 reports bad data as OSError; reading never touches our disk, so none is ENOSPC.
            except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError) as error:
                raise _invalid(entry.info.filename, f"cannot be decompressed ({error})") from None
            if not chunk:
                break
            budget.spend(len(chunk), entry.info.filename)
            out.write(chunk)


def _write(
    archive: zipfile.ZipFile, plan: _Plan, root: Path, limits: UnpackLimits, abort: threading.Event | None
) -> int:
    declared = sum(entry.info.file_size for entry in plan.entries.values())
    if declared > limits.max_total_bytes:
        raise BuildFailed.because(
            ARCHIVE_INVALID,
            f"The code artifact zip declares {declared} bytes of content; this server accepts at most "
            f"{limits.max_total_bytes}.",
        )
    budget = _ByteBudget(limits.max_total_bytes, abort)
    ordered = sorted(plan.entries.items(), key=lambda item: len(item[0]))
    for parts in sorted(plan.directories | {p for p, e in ordered if e.kind == "dir"}, key=len):
        _check_abort(abort)
        (root.joinpath(*parts)).mkdir(mode=0o700, exist_ok=True)
    # Links last: while regular files are written every parent is a directory made above.
    for parts, entry in ordered:
        _check_abort(abort)
        if entry.kind == "file":
            _extract_file(archive, entry, root.joinpath(*parts), budget)
    for parts, entry in ordered:
        _check_abort(abort)
        if entry.kind == "hardlink":
            os.link(
                root.joinpath(*entry.link_target.split("/")), root.joinpath(*parts), follow_symlinks=False
            )
        elif entry.kind == "symlink":
            os.symlink(entry.link_target, root.joinpath(*parts))
    for parts, entry in ordered:
        _check_abort(abort)
        path = root.joinpath(*parts)
        if entry.kind in ("file", "hardlink"):
            os.chmod(path, entry.mode)
            os.utime(path, (_timestamp(entry.info),) * 2)
    # Directories last and deepest first, so that writing children does not bump their mtimes.
    for parts in sorted(plan.directories | {p for p, e in ordered if e.kind == "dir"}, key=len, reverse=True):
        _check_abort(abort)
        entry = plan.entries.get(parts)
        path = root.joinpath(*parts)
        os.chmod(path, entry.mode if entry is not None else 0o755)
        if entry is not None:
            os.utime(path, (_timestamp(entry.info),) * 2)
    return budget.used


def unpack_artifact(
    zip_path: Path,
    context_dir: Path,
    limits: UnpackLimits | None = None,
    abort: threading.Event | None = None,
) -> UnpackedContext:
    """Check and unpack `zip_path` into `context_dir` (created; must not exist yet)."""
    limits = limits or UnpackLimits()
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as error:
        raise BuildFailed.because(
            ARCHIVE_INVALID, f"The code artifact is not a valid zip archive ({error}). Upload a .zip file."
        ) from None
    with archive:
        try:
            plan = _plan(archive, limits, abort)
            _check_dockerfile(plan)
            context_dir.mkdir(mode=0o700, parents=False, exist_ok=False)
            total = _write(archive, plan, context_dir, limits, abort)
            os.chmod(context_dir, 0o755)
        except BuildFailed:
            raise
        except (
            zipfile.BadZipFile,
            zlib.error,
            EOFError,
            NotImplementedError,
            RuntimeError,
            ValueError,
        ) as error:
            raise BuildFailed.because(
                ARCHIVE_INVALID, f"The code artifact zip is damaged or uses an unsupported feature: {error}."
            ) from None
        except OSError as error:
            if is_disk_full(error):
                raise disk_full("unpacking the code artifact") from None
            if error.errno == errno.ENAMETOOLONG:  # entry names are checked: the build dir is long
                raise BuildFailed.because(
                    ARCHIVE_INVALID,
                    "The code artifact zip is not acceptable: a path in it is too long for this "
                    "server's file system. Use shorter file names and fewer directory levels.",
                ) from None
            raise
    files = sum(1 for entry in plan.entries.values() if entry.kind != "dir")
    return UnpackedContext(context_dir, files, total)


async def unpack_artifact_async(
    zip_path: Path, context_dir: Path, limits: UnpackLimits | None = None
) -> UnpackedContext:
    return await in_thread(lambda abort: unpack_artifact(zip_path, context_dir, limits, abort))


def dockerfile_path(context: UnpackedContext | Path) -> Path:
    root = context.path if isinstance(context, UnpackedContext) else context
    return root / PurePosixPath(DOCKERFILE)
