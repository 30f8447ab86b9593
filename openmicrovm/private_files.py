"""Private directories and key files: what the server keeps from other users of the host.

The data dir holds the database, token keys, the TLS CA key and every MicroVM's memory; the cache
dir holds the build layers. Both are 0700, and a key file is written so that it is 0600 from the
moment it exists and a crash leaves either the old key or the new one, never a truncated one.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def private_dir(path: Path, what: str) -> Path:
    """Make `path` (and each missing parent) mode 0700; an existing `path` that other users can
    reach is tightened to 0700 with a WARNING. Parents that already exist are left alone: they
    are not ours (a home directory, /var/lib)."""
    missing: list[Path] = []
    current = path
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by another process: its mode is checked below for `path`
        # mkdir's mode passes through the umask; set it exactly.
        os.chmod(directory, PRIVATE_DIR_MODE)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        try:
            os.chmod(path, PRIVATE_DIR_MODE)
        except PermissionError:  # owned by another user: say so rather than refuse to start
            log.warning(
                "the %s %s is accessible to other users (mode %04o) and could not be made 0700",
                what,
                path,
                mode,
            )
        else:
            log.warning("the %s %s was accessible to other users (mode %04o); made it 0700", what, path, mode)
    return path


def write_private_file(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace `path` with `data`: a temporary file beside it, created 0600 (O_EXCL: never one that
    someone else made or left behind), written and fsynced, then renamed over `path`, and the
    directory fsynced so that the rename itself survives a crash. Readers see the old content or
    the new one, never a part. Without `durable`, no fsync: the file survives a crash of the
    process (the kernel has it), not one of the machine; for files that describe what a machine
    crash ends anyway (a running sandbox), written on the event loop where an fsync may wait long."""
    directory = path.parent
    fd = -1
    temporary = directory
    for _ in range(16):
        temporary = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(
                temporary,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                PRIVATE_FILE_MODE,
            )
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"cannot create a temporary file beside {path}")
    try:
        try:
            # The umask can only clear bits, but a umask of e.g. 0o277 would leave the owner
            # unable to rewrite the file: make it exactly 0600 before any byte is in it.
            os.fchmod(fd, PRIVATE_FILE_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if not durable:
        return
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
