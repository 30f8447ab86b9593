"""Reading an image root filesystem from the host: users, groups, the entrypoint.

Paths inside an image may be symlinks that point anywhere (`/etc/passwd -> /host/file`), so every
lookup resolves links itself and never leaves the image root.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .driver import DriverError, ProcessConfig

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MAX_LINKS = 40


def resolve_in_root(root: Path, path: str) -> Path | None:
    """The host path of `path` inside `root`, following symlinks as the sandbox would see them;
    None when it does not exist."""
    parts = [p for p in PurePosixPath("/", path).parts[1:] if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            info = candidate.lstat()
        except OSError:
            return None
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > _MAX_LINKS:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in PurePosixPath(target).parts if p not in ("", ".", "/")] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def _read_db(root: Path, name: str) -> list[list[str]]:
    path = resolve_in_root(root, f"/etc/{name}")
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def resolve_user(root: Path, user: str) -> ResolvedUser:
    """Resolve "uid", "uid:gid", "name" or "name:group" the way container runtimes do: a numeric
    uid that /etc/passwd does not know runs with gid 0 and home "/"."""
    user = user.strip() or "0"
    name_part, _, group_part = user.partition(":")
    passwd = _read_db(root, "passwd")
    groups = _read_db(root, "group")
    entry = None
    for row in passwd:
        if len(row) >= 7 and (row[0] == name_part or (name_part.isdigit() and row[2] == name_part)):
            entry = row
            break
    if entry is not None:
        uid, gid, home, login = int(entry[2]), int(entry[3]), entry[5] or "/", entry[0]
    elif name_part.isdigit():
        uid, gid, home, login = int(name_part), 0, "/", None
    else:
        raise DriverError(f"user {name_part!r} is not in the image's /etc/passwd")
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            match = [row for row in groups if len(row) >= 3 and row[0] == group_part]
            if not match:
                raise DriverError(f"group {group_part!r} is not in the image's /etc/group")
            gid = int(match[0][2])
    extra = []
    if login is not None and not group_part:
        for row in groups:
            if len(row) >= 4 and login in row[3].split(",") and row[2].isdigit():
                extra.append(int(row[2]))
    all_groups = tuple(dict.fromkeys([gid, *extra]))
    return ResolvedUser(uid, gid, all_groups, home)


def _is_executable_file(path: Path) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and bool(info.st_mode & 0o111)


def check_process(root: Path, process: ProcessConfig) -> None:
    """Fail early, with the image's own paths in the message, when the app cannot start."""
    if not root.is_dir():
        raise DriverError(f"image root filesystem {root} does not exist")
    if not process.argv:
        raise DriverError("the image has no entrypoint or command")
    workdir = resolve_in_root(root, process.workdir or "/")
    if workdir is None or not workdir.is_dir():
        raise DriverError(f"working directory {process.workdir!r} does not exist in the image")
    program = process.argv[0]
    if "/" in program:
        full = program if program.startswith("/") else str(PurePosixPath(process.workdir or "/", program))
        found = resolve_in_root(root, full)
        if found is None:
            raise DriverError(f"entrypoint {program!r} does not exist in the image")
        if not _is_executable_file(found):
            raise DriverError(f"entrypoint {program!r} in the image is not an executable file")
        return
    search = process.env.get("PATH", DEFAULT_PATH)
    for directory in search.split(":"):
        if directory.startswith("/"):
            found = resolve_in_root(root, f"{directory}/{program}")
            if found is not None and _is_executable_file(found):
                return
    raise DriverError(f"entrypoint {program!r} is not in the image (searched PATH={search})")


def app_environment(process: ProcessConfig, user: ResolvedUser) -> dict[str, str]:
    """The environment the app starts with: the image's, plus PATH and HOME when it lacks them."""
    env = {"PATH": DEFAULT_PATH, "HOME": user.home}
    env.update(process.env)
    return env


def overlay_safe(path: Path) -> str:
    """path as an overlayfs mount option; those are comma-separated and ':' separates lower dirs."""
    text = str(path)
    if any(c in text for c in ",:\\\n"):
        raise DriverError(f"path {text} cannot be used in an overlay mount (it contains ',', ':' or '\\')")
    return text


def tree_size(root: Path) -> int:
    """Bytes of regular files under root (hard links counted once); for SnapshotInfo.code_bytes."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for directory, _dirs, files in os.walk(root):
        for name in files:
            try:
                info = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total
