"""Writing one file of a fetched tree: always a new file (O_EXCL, never through a symlink), and
only with bytes whose sha256 has been checked."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import IO

from .client import READ_CHUNK
from .errors import ObjectStoreError

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_file(path: Path) -> IO[bytes]:
    """A new, empty file only its owner can read until its metadata is applied."""
    return os.fdopen(os.open(path, _CREATE, 0o600), "wb")


def copy_verified(source: Path, destination: Path, sha256: str, size: int) -> bool:
    """Copy a local file known by its hash; False (and nothing left at `destination`) when the
    source no longer holds those bytes."""
    digest = hashlib.sha256()
    copied = 0
    try:
        with open(source, "rb") as reader, create_file(destination) as writer:
            while chunk := reader.read(READ_CHUNK):
                copied += len(chunk)
                if copied > size:
                    break
                digest.update(chunk)
                writer.write(chunk)
    except FileNotFoundError:
        destination.unlink(missing_ok=True)
        return False
    if copied != size or digest.hexdigest() != sha256:
        destination.unlink()
        return False
    return True


def hashes_to(path: Path, sha256: str, size: int) -> bool:
    try:
        if os.lstat(path).st_size != size:
            return False
        with open(path, "rb") as reader:
            return hashlib.file_digest(reader, "sha256").hexdigest() == sha256
    except FileNotFoundError:
        return False


def wrap_os_error(action: str, error: OSError) -> ObjectStoreError:
    return ObjectStoreError(f"cannot {action}: {error}")
