"""Bytes on a socket, for what no HTTP client would send: malformed request lines, huge or folded
headers, smuggling attempts, bytes trickled one a second. Every read has a deadline, so a server
that never answers shows up as `timed_out`, never as a hung test."""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


@dataclass
class Exchange:
    """What came back for some bytes sent: every byte read, whether the peer closed, or whether
    the deadline passed first."""

    data: bytes
    closed: bool
    timed_out: bool
    error: str | None = None

    @property
    def statuses(self) -> list[int]:
        """Status codes of every response found in the bytes, in order."""
        return [int(code) for code in _STATUS.findall(self.data)]

    @property
    def status(self) -> int | None:
        found = _STATUS.match(self.data)
        return int(found.group(1)) if found else None

    @property
    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]


def exchange(
    port: int, payload: bytes, *, timeout: float = 15.0, linger: float = 0.0, host: str = "127.0.0.1"
) -> Exchange:
    """Send payload, then read until the peer closes, `timeout` passes, or (with linger > 0) no byte
    arrived for `linger` seconds after the first one (for connections the server keeps open)."""
    deadline = time.monotonic() + timeout
    data = b""
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(payload)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return Exchange(data, False, True)
                sock.settimeout(min(left, linger) if (linger and data) else left)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    if linger and data:
                        return Exchange(data, False, False)
                    continue
                if not chunk:
                    return Exchange(data, True, False)
                data += chunk
    except ConnectionResetError as error:
        return Exchange(data, True, False, f"reset: {error}")
    except OSError as error:
        return Exchange(data, True, False, f"{type(error).__name__}: {error}")


@dataclass
class Trickler:
    """A client that sends `payload` one byte every `interval` seconds (slowloris) on its own
    thread and records when the server closed the connection (None while it is open)."""

    port: int
    payload: bytes
    interval: float = 1.0
    started: float = 0.0
    closed_after: float | None = None
    answer: bytes = b""
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Trickler:
        self._thread = threading.Thread(target=self._run, name="slowloris", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        self.started = time.monotonic()
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            self.closed_after = 0.0
            return
        sock.settimeout(self.interval)
        try:
            for byte in self.payload:
                if self._stop.is_set():
                    return
                try:
                    sock.sendall(bytes([byte]))
                    self.sent += 1
                except OSError:
                    break
                if self._drained(sock):
                    break
            while not self._stop.is_set() and not self._drained(sock):
                pass
        finally:
            if self.closed_after is None and not self._stop.is_set():
                self.closed_after = time.monotonic() - self.started
            sock.close()

    def _drained(self, sock: socket.socket) -> bool:
        """Wait up to one interval for bytes; True once the server closed the connection."""
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:
            self.closed_after = time.monotonic() - self.started
            return True
        if not chunk:
            self.closed_after = time.monotonic() - self.started
            return True
        self.answer += chunk
        return False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
