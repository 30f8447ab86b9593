"""A stand-in for "the internet" in builder tests: a network namespace of the test's own, joined
to the host by a veth pair on a random /30 of 198.18.0.0/15 (RFC 2544 benchmarking space, never
routed outside), with TCP listeners the test opens inside it. From a build it is reached like any
outside address (forwarded and masqueraded by the host), without needing the real internet.

The host end of the veth (`host_address`) is an address of the host itself, so it also serves to
check that a build cannot reach the host on a non-loopback address.
"""

from __future__ import annotations

import ctypes
import http.server
import ipaddress
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_BENCHMARK_NET = ipaddress.IPv4Network("198.18.0.0/15")

T = TypeVar("T")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def in_netns(name: str, action: Callable[[], T]) -> T:
    """Run `action` on a throw-away thread that has joined network namespace `name` (sockets it
    creates stay in that namespace)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {name}")
            finally:
                os.close(fd)
            result.append(action())
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=work, name=f"in-{name}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class FakeInternet:
    netns: str
    host_address: str  # the host's end: an address of the host itself
    address: str  # the "internet" side
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def serve_files(self, files: dict[str, bytes]) -> int:
        """An HTTP server inside the namespace serving `files` (path -> body); returns its port."""
        handler = type("Files", (_Files,), {"files": dict(files)})
        server = in_netns(self.netns, lambda: http.server.ThreadingHTTPServer((self.address, 0), handler))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def close() -> None:
            server.shutdown()
            server.server_close()
            thread.join()

        self._closers.append(close)
        return int(server.server_address[1])

    def silent_port(self) -> int:
        """A port inside the namespace that accepts connections and never answers."""
        listener = in_netns(self.netns, socket.socket)
        listener.bind((self.address, 0))
        listener.listen(16)
        accepted: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    accepted.append(listener.accept()[0])
                except OSError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()

        def close() -> None:
            stop.set()
            thread.join()
            for connection in accepted:
                connection.close()
            listener.close()

        self._closers.append(close)
        return int(listener.getsockname()[1])

    def close(self) -> None:
        for close in reversed(self._closers):
            close()
        self._closers.clear()


@contextmanager
def fake_internet() -> Iterator[FakeInternet]:
    tag = secrets.token_hex(3)
    netns, host_link = f"omvt-{tag}", f"omvt{tag}h"
    block = ipaddress.IPv4Network((int(_BENCHMARK_NET.network_address) + 4 * secrets.randbelow(2**15), 30))
    host_address, address = str(block.network_address + 1), str(block.network_address + 2)
    _ip("netns", "add", netns)
    try:
        _ip("link", "add", host_link, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("addr", "add", f"{host_address}/30", "dev", host_link)
        _ip("link", "set", host_link, "up")
        _ip("-n", netns, "addr", "add", f"{address}/30", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        internet = FakeInternet(netns, host_address, address)
        try:
            yield internet
        finally:
            internet.close()
    finally:
        subprocess.run(["ip", "link", "delete", host_link], capture_output=True)
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
