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


@dataclass
class _Plan:
    entries: dict[tuple[str, ...], _Entry] = field(default_factory=dict)
    # Directories implied by entry paths, whether or not the zip lists them.
    directories: set[tuple[str, ...]] = field(default_factory=set)


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
    parts = tuple(part for part in posix.split("/") if part not in ("", "."))
    if ".." in parts:
        raise _invalid(name, "has a '..' path component that points outside the build context")
    for part in parts:
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


def _resolve(
    plan: _Plan, start: tuple[str, ...], target: str, entry_name: str, hops: int = 0
) -> tuple[str, ...]:
    """Where `target`, seen from directory `start`, ends up once every link in the archive is
    followed. Raises ARCHIVE_INVALID when it leaves the context at any step."""
    if hops > _MAX_LINK_HOPS:
        raise _invalid(entry_name, "is part of a symlink loop")
    if target.startswith("/"):
        raise _invalid(
            entry_name, f"links to the absolute path '{_printable(target)}', outside the build context"
        )
    current = list(start)
    components = [part for part in target.split("/") if part not in ("", ".")]
    for part in components:
        if part == "..":
            if not current:
                raise _invalid(
                    entry_name, f"links to '{_printable(target)}', which points outside the build context"
                )
            current.pop()
            continue
        current.append(part)
        linked = plan.entries.get(tuple(current))
        if linked is not None and linked.kind == "symlink":
            resolved = _resolve(plan, tuple(current[:-1]), linked.link_target, entry_name, hops + 1)
            current = list(resolved)
    return tuple(current)


def _plan(archive: zipfile.ZipFile, limits: UnpackLimits) -> _Plan:
    infos = archive.infolist()
    if len(infos) > limits.max_files:
        raise BuildFailed.because(
            ARCHIVE_INVALID,
            f"The code artifact zip holds {len(infos)} entries; this server accepts at most "
            f"{limits.max_files}.",
        )
    plan = _Plan()
    for info in infos:
        parts = _normalise(info)
        if not parts:
            continue  # an entry for the root directory itself
        entry = _classify(info, parts)
        if parts in plan.entries:
            raise _invalid(info.filename, "appears more than once")
        plan.entries[parts] = entry
        for depth in range(1, len(parts)):
            plan.directories.add(parts[:depth])
    for parts, entry in plan.entries.items():
        # Never write through a link: an entry below a symlink entry could land anywhere.
        for depth in range(1, len(parts)):
            parent = plan.entries.get(parts[:depth])
            if parent is not None and parent.kind != "dir":
                raise _invalid(
                    entry.info.filename,
                    f"lies below '{_printable(parent.info.filename)}', which is not a directory",
                )
    for parts, entry in plan.entries.items():
        if entry.kind != "dir" and parts in plan.directories:
            raise _invalid(entry.info.filename, "is both a file and the directory of other entries")
        if entry.kind == "symlink":
            entry.link_target = _read_link_target(archive, entry)
    for parts, entry in plan.entries.items():
        if entry.kind == "symlink":
            _resolve(plan, parts[:-1], entry.link_target, entry.info.filename)
        elif entry.kind == "hardlink":
            target = _resolve(plan, (), entry.link_target.replace("\\", "/"), entry.info.filename)
            linked = plan.entries.get(target)
            if linked is None or linked.kind != "file":
                raise _invalid(
                    entry.info.filename,
                    f"is a hard link to '{_printable(entry.link_target)}', which is not a regular file in the archive",
                )
            entry.link_target = "/".join(target)
    return plan


def _check_dockerfile(plan: _Plan) -> None:
    entry = plan.entries.get((DOCKERFILE,))
    if entry is not None and entry.kind in ("file", "hardlink"):
        return
    if entry is not None and entry.kind == "symlink":
        target = plan.entries.get(_resolve(plan, (), entry.link_target, entry.info.filename))
        if target is not None and target.kind in ("file", "hardlink"):
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
        if self.abort is not None and self.abort.is_set():
            raise Aborted("unpacking cancelled")
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
        (root.joinpath(*parts)).mkdir(mode=0o700, exist_ok=True)
    # Links last: while regular files are written every parent is a directory made above.
    for parts, entry in ordered:
        if abort is not None and abort.is_set():
            raise Aborted("unpacking cancelled")
        if entry.kind == "file":
            _extract_file(archive, entry, root.joinpath(*parts), budget)
    for parts, entry in ordered:
        if entry.kind == "hardlink":
            os.link(
                root.joinpath(*entry.link_target.split("/")), root.joinpath(*parts), follow_symlinks=False
            )
        elif entry.kind == "symlink":
            os.symlink(entry.link_target, root.joinpath(*parts))
    for parts, entry in ordered:
        path = root.joinpath(*parts)
        if entry.kind in ("file", "hardlink"):
            os.chmod(path, entry.mode)
            os.utime(path, (_timestamp(entry.info),) * 2)
    # Directories last and deepest first, so that writing children does not bump their mtimes.
    for parts in sorted(plan.directories | {p for p, e in ordered if e.kind == "dir"}, key=len, reverse=True):
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
            plan = _plan(archive, limits)
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
