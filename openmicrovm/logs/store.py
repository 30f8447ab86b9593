"""Per-build and per-MicroVM logs in the data dir: one file per stream, capped and rotated.

A stream is named "builds/<build id>" or "microvms/<microvm id>". Each line is
"<ISO-8601 UTC timestamp> <message>". When a file passes the size cap it becomes <name>.log.1
(older ones shift up to keep_files) so the newest output always survives; everything survives
restarts because it is just files.

Readers (the logs route, the CloudWatch shipper) address a stream by a logical byte offset that
only ever grows: rotation moves bytes between files but never changes their offset. The offset
where the current file starts is kept beside it in <name>.base, written at each rotation.
"""

from __future__ import annotations

import datetime
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# CloudWatch Logs refuses events over 256 KiB; a longer line is cut so it can still be shipped.
MAX_LINE_BYTES = 256 * 1024 - 1024
# Appending through a cached descriptor is ~10x faster than open-per-line for chatty apps; the
# cache is bounded so thousands of idle streams do not exhaust descriptors.
MAX_OPEN_FILES = 128
_TRUNCATED = b" [line truncated]"


class _Stamps:
    """The "<ISO-8601 UTC timestamp> " that starts each line. The part up to the seconds is
    formatted once a second: formatting a datetime per line was most of the cost of appending."""

    def __init__(self) -> None:
        self._cached: tuple[int, bytes] = (-1, b"")

    def __call__(self, at: float | None) -> bytes:
        now = time.time() if at is None else at
        second = math.floor(now)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = (
                datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.").encode()
            )
            self._cached = (second, prefix)
        return prefix + b"%03dZ " % min(int((now - second) * 1000), 999)


def split_line(line: str) -> tuple[float | None, str]:
    """(epoch seconds, message) of a stored line; None when the line carries no timestamp."""
    stamp, _, message = line.partition(" ")
    if len(stamp) != 24 or not stamp.endswith("Z"):
        return None, line
    try:
        moment = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None, line
    return moment.timestamp(), message


@dataclass(frozen=True)
class LogChunk:
    """Whole lines read from a stream, with the logical offset just after each one."""

    lines: list[str]
    ends: list[int]
    next_offset: int
    # Bytes between the offset asked for and the oldest byte still kept (rotated away).
    skipped: int
    # Where the stream ends now; next_offset == end_offset means the reader is caught up.
    end_offset: int


@dataclass
class _OpenFile:
    handle: object  # a raw (unbuffered) binary file, so each append is one write(2)
    size: int


@dataclass
class WriteCounters:
    """What was appended since start, by stream kind, for metrics."""

    lines: dict[str, int] = field(default_factory=lambda: {"builds": 0, "microvms": 0})
    bytes: dict[str, int] = field(default_factory=lambda: {"builds": 0, "microvms": 0})


class LogStore:
    def __init__(self, root: Path, max_bytes: int, keep_files: int) -> None:
        self.root = root
        self.max_bytes = max(max_bytes, 256)
        self.keep_files = max(keep_files, 1)
        self.max_line_bytes = max(min(MAX_LINE_BYTES, self.max_bytes - 64), 64)
        self.counters = WriteCounters()
        self._lock = threading.Lock()
        # Open files by stream name: building a Path per append cost more than the write.
        self._open: OrderedDict[str, _OpenFile] = OrderedDict()
        self._stamp = _Stamps()

    def path(self, stream: str) -> Path:
        kind, _, name = stream.partition("/")
        if kind not in ("builds", "microvms") or not name or "/" in name or name.startswith("."):
            raise ValueError(f"not a log stream name: {stream!r}")
        return self.root / kind / f"{name}.log"

    # -- writing ---------------------------------------------------------------------------------
    def _encode(self, message: str, at: float | None) -> tuple[bytes, int]:
        stamp = self._stamp(at)
        lines = message.rstrip("\n").encode("utf-8", "replace").split(b"\n")
        if len(lines) * (len(stamp) + 1) + sum(map(len, lines)) <= self.max_bytes and all(
            len(line) <= self.max_line_bytes for line in lines
        ):
            # The common case, joined in one go: a chatty app hands over hundreds of lines at once.
            return stamp + (b"\n" + stamp).join(lines) + b"\n", len(lines)
        stamped = []
        for line in lines:
            if len(line) > self.max_line_bytes:
                keep = self.max_line_bytes - len(_TRUNCATED)
                line = line[:keep].decode("utf-8", "ignore").encode() + _TRUNCATED
            stamped.append(stamp + line + b"\n")
        # One message larger than the cap keeps its newest lines, like rotation would.
        total = sum(map(len, stamped))
        while total > self.max_bytes and len(stamped) > 1:
            total -= len(stamped.pop(0))
        return b"".join(stamped), len(stamped)

    def append(self, stream: str, message: str, at: float | None = None) -> None:
        data, count = self._encode(message, at)
        kind = stream.partition("/")[0]
        with self._lock:
            opened = self._handle(stream)
            if opened.size and opened.size + len(data) > self.max_bytes:
                self._rotate(stream, opened.size)
                opened = self._handle(stream)
            opened.handle.write(data)  # type: ignore[attr-defined]
            opened.size += len(data)
            self.counters.lines[kind] += count
            self.counters.bytes[kind] += len(data)

    def _handle(self, stream: str) -> _OpenFile:
        opened = self._open.get(stream)
        if opened is not None:
            self._open.move_to_end(stream)
            return opened
        path = self.path(stream)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "ab", buffering=0)  # kept open in the cache
        opened = self._open[stream] = _OpenFile(handle, os.fstat(handle.fileno()).st_size)
        while len(self._open) > MAX_OPEN_FILES:
            _, oldest = self._open.popitem(last=False)
            oldest.handle.close()  # type: ignore[attr-defined]
        return opened

    def _close(self, stream: str) -> None:
        opened = self._open.pop(stream, None)
        if opened is not None:
            opened.handle.close()  # type: ignore[attr-defined]

    def _rotate(self, stream: str, current_size: int) -> None:
        self._close(stream)
        path = self.path(stream)
        self._write_base(path, self._base(path) + current_size)
        for index in range(self.keep_files - 1, 0, -1):
            older = path.with_name(f"{path.name}.{index}")
            if older.exists():
                if index + 1 >= self.keep_files:
                    older.unlink()
                else:
                    older.rename(path.with_name(f"{path.name}.{index + 1}"))
        if self.keep_files > 1:
            path.rename(path.with_name(f"{path.name}.1"))
        else:
            path.unlink()

    def close(self) -> None:
        with self._lock:
            for stream in list(self._open):
                self._close(stream)

    # -- logical offsets -------------------------------------------------------------------------
    def _base_path(self, path: Path) -> Path:
        return path.with_name(path.name[: -len(".log")] + ".base")

    def _rotated(self, path: Path) -> list[Path]:
        """Rotated files, oldest first."""
        candidates = [path.with_name(f"{path.name}.{i}") for i in range(self.keep_files, 0, -1)]
        return [p for p in candidates if p.exists()]

    def _base(self, path: Path) -> int:
        try:
            return int(self._base_path(path).read_text())
        except (FileNotFoundError, ValueError):
            # Logs written before offsets were kept: the oldest kept byte is offset 0.
            return sum(p.stat().st_size for p in self._rotated(path))

    def _write_base(self, path: Path, value: int) -> None:
        target = self._base_path(path)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(str(value))
        os.replace(temporary, target)

    def _layout(self, path: Path) -> list[tuple[Path, int, int]]:
        """(file, logical start, size) for every kept file, oldest first."""
        base = self._base(path)
        current = path.stat().st_size if path.exists() else 0
        layout = [(path, base, current)]
        start = base
        for older in reversed(self._rotated(path)):
            size = older.stat().st_size
            start -= size
            layout.insert(0, (older, start, size))
        return layout

    def end_offset(self, stream: str) -> int:
        path = self.path(stream)
        with self._lock:
            _, start, size = self._layout(path)[-1]
            return start + size

    def read_from(self, stream: str, offset: int, limit: int = 256 * 1024) -> LogChunk:
        """Whole lines from logical `offset` on, about `limit` bytes of them (at least one line)."""
        path = self.path(stream)
        limit = max(limit, self.max_line_bytes + 64)
        with self._lock:
            layout = self._layout(path)
            end = layout[-1][1] + layout[-1][2]
            oldest = layout[0][1]
            position = min(max(offset, oldest), end)
            skipped = max(0, min(oldest, end) - offset)
            data = bytearray()
            for file, start, size in layout:
                reached = position + len(data)
                if reached >= start + size or len(data) >= limit:
                    continue
                with open(file, "rb") as handle:
                    handle.seek(reached - start)
                    data += handle.read(min(limit - len(data), start + size - reached))
        lines: list[str] = []
        ends: list[int] = []
        cursor = 0
        while True:
            newline = data.find(b"\n", cursor)
            if newline < 0:
                break
            lines.append(data[cursor:newline].decode("utf-8", "replace"))
            cursor = newline + 1
            ends.append(position + cursor)
        if not lines and len(data) >= limit:
            # A line longer than any reader's limit (written before lines were capped): hand it
            # out in pieces rather than stall every reader on it forever.
            lines, cursor = [data.decode("utf-8", "replace")], len(data)
            ends.append(position + cursor)
        return LogChunk(lines, ends, position + cursor, skipped, end)

    # -- whole streams ---------------------------------------------------------------------------
    def files(self, stream: str) -> list[Path]:
        """Oldest first: <name>.log.N ... <name>.log.1, <name>.log."""
        path = self.path(stream)
        return [p for p in [*self._rotated(path), path] if p.exists()]

    def read(self, stream: str) -> Iterator[str]:
        for file in self.files(stream):
            with open(file, encoding="utf-8", errors="replace") as handle:
                yield from (line.rstrip("\n") for line in handle)

    def exists(self, stream: str) -> bool:
        return bool(self.files(stream))

    def size(self, stream: str) -> int:
        return sum(os.path.getsize(p) for p in self.files(stream))

    def delete(self, stream: str) -> None:
        path = self.path(stream)
        with self._lock:
            self._close(stream)
            for file in self.files(stream):
                file.unlink(missing_ok=True)
            self._base_path(path).unlink(missing_ok=True)
