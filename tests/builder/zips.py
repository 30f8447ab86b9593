"""Writing real zip archives for tests, including the entry kinds a hostile zip may hold."""

from __future__ import annotations

import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    name: str
    data: bytes = b""
    mode: int = stat.S_IFREG | 0o644
    hardlink_to: str | None = None  # written as a PKWARE Unix extra field (0x000d)


def file(name: str, data: bytes | str = b"", mode: int = 0o644) -> Entry:
    return Entry(name, data.encode() if isinstance(data, str) else data, stat.S_IFREG | mode)


def directory(name: str) -> Entry:
    return Entry(name.rstrip("/") + "/", b"", stat.S_IFDIR | 0o755)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, target.encode(), stat.S_IFLNK | 0o777)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, b"", stat.S_IFREG | 0o644, hardlink_to=target)


def special(name: str, file_type: int) -> Entry:
    return Entry(name, b"", file_type | 0o644)


def write_zip(path: Path, entries: list[Entry]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for entry in entries:
            info = zipfile.ZipInfo(entry.name, date_time=(2024, 1, 2, 3, 4, 6))
            info.create_system = 3  # Unix: the mode bits in external_attr count
            info.external_attr = (entry.mode & 0xFFFF) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            if entry.hardlink_to is not None:
                link = entry.hardlink_to.encode()
                info.extra = struct.pack("<HHIIHH", 0x000D, 12 + len(link), 0, 0, 0, 0) + link
            archive.writestr(info, entry.data)
    return path


def directory_zip(path: Path, source: Path) -> Path:
    """Zip a directory of files (e.g. examples/sample-app) with the Dockerfile at the root."""
    entries = [
        file(str(item.relative_to(source)), item.read_bytes(), item.stat().st_mode & 0o777)
        for item in sorted(source.rglob("*"))
        if item.is_file()
    ]
    return write_zip(path, entries)
