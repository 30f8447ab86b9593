"""A stand-in for "the internet" in builder tests: a network namespace of the test's own, joined
to the host by a veth pair on a random /30 of 198.18.0.0/15 (RFC 2544 benchmarking space, never
routed outside), with TCP listeners the test opens inside it. From a build it is reached like any
outside address (forwarded and masqueraded by the host), without needing the real internet.

The host end of the veth (`host_address`) is an address of the host itself, so it also serves to
check that a build cannot reach the host on a non-loopback address.

fake_internet(within=...) makes the same on a /30 of another range, e.g. a private one (a stand-in
for the operator's LAN): the /30 is one that no route of the host overlaps, so the namespace's
connected route is the only way there and nothing leaves the machine.
"""

from __future__ import annotations

import ctypes
import http.server
import ipaddress
import json
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
    accepted: int = 0  # connections the silent ports accepted
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def network(self) -> ipaddress.IPv4Network:
        """The /30 joining the namespace to the host (both ends' addresses)."""
        return ipaddress.IPv4Network(f"{self.address}/30", strict=False)

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

    def silent_port(self, port: int = 0) -> int:
        """A port inside the namespace (`port`, or a free one) that accepts connections and never
        answers."""
        listener = in_netns(self.netns, socket.socket)
        listener.bind((self.address, port))
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
                self.accepted += 1

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


def _host_routes() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host routes somewhere, its own addresses included, but the default."""
    listed = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    ).stdout
    routes = []
    for route in json.loads(listed or "[]"):
        dst = str(route.get("dst", ""))
        if dst and dst != "default":
            routes.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
    return routes


def _free_block(within: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """A random /30 of `within` that no route of the host overlaps."""
    routes = _host_routes()
    for _ in range(100):
        offset = 4 * secrets.randbelow(within.num_addresses // 4)
        block = ipaddress.IPv4Network((int(within.network_address) + offset, 30))
        if not any(route.prefixlen > 0 and route.overlaps(block) for route in routes):
            return block
    raise RuntimeError(f"no /30 of {within} is free of the host's routes")


@contextmanager
def fake_internet(within: str = str(_BENCHMARK_NET)) -> Iterator[FakeInternet]:
    tag = secrets.token_hex(3)
    netns, host_link = f"omvt-{tag}", f"omvt{tag}h"
    block = _free_block(ipaddress.IPv4Network(within))
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
