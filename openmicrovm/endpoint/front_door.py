"""One listening socket for the API and every MicroVM endpoint.

The first request head of each connection decides who owns the connection: a Host naming a
MicroVM endpoint (`<uuid>.lambda-microvm.<region>.localhost[:port]`) goes to the proxy, which
relays bytes without re-encoding them; everything else (the API, `/metrics`, the shell
WebSocket) is handed, with the bytes already read, to the aiohttp server. A connection that
speaks HTTP/2 (TLS that chose `h2` by ALPN, or the h2c preface on the cleartext port) carries
endpoint streams only, each naming its MicroVM in :authority (h2_server.py, h2_relay.py).

Connections that have not yet proven themselves are capped: a flood of idle sockets must not hold
the server's file descriptors and memory. A connection is unproven until its first request head
is complete (API, shell) or, on an endpoint, until a request passes its token check. Beyond
MAX_UNAUTHENTICATED, each new connection closes the oldest unproven one: the flood ages out
within a moment, while a real client (which sends its head at once) gets through and is served.
Refusing new connections instead would let the flood lock every new client out.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from aiohttp import web

from openmicrovm.endpoint.backend import EndpointBackend
from openmicrovm.endpoint.h2_relay import H2EndpointRelay
from openmicrovm.endpoint.h2_server import PREFACE, H2ServerConnection
from openmicrovm.endpoint.hostnames import endpoint_hostname
from openmicrovm.endpoint.http1 import (
    BODY_PROGRESS_BYTES,
    BODY_TIMEOUT,
    MAX_HEAD_BYTES,
    ProtocolError,
    read_head,
    simple_response,
)
from openmicrovm.endpoint.proxy import HEAD_TIMEOUT, Counters, EndpointConnection

# Connections at once that have not completed a first head / passed a token check. Real clients
# spend microseconds in that state, so this bounds a flood with room for bursts of new clients
# (asyncio accepts up to 100 connections per turn of the loop).
MAX_UNAUTHENTICATED = 512

_HOST_LINE = re.compile(rb"\r\nhost:[ \t]*([^\r\n]*)", re.IGNORECASE)
_SHELL_TARGET = re.compile(rb"^GET /shell(?:\?[^ ]*)? HTTP/1\.1\r\n")
# A CR or LF that is not part of a CRLF: parsers disagree on where such a line ends (smuggling).
_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def _is_shell(head: bytes) -> bool:
    """The shell WebSocket (`/shell` on port 8022, spec §5.6) is served by us, not by the app."""
    if not _SHELL_TARGET.match(head):
        return False
    lowered = head.lower()
    explicit = re.search(rb"\r\nx-aws-proxy-port:[ \t]*([0-9]+)", lowered) or re.search(
        rb"lambda-microvms\.port\.([0-9]+)", lowered
    )
    return b"upgrade: websocket" in lowered and (explicit is None or explicit.group(1) == b"8022")


class _FirstHead(asyncio.Protocol):
    """Holds a new connection's bytes until its first request head is complete, then gives the
    connection to its owner: the endpoint proxy, or aiohttp. A low-level protocol rather than
    asyncio streams, because a StreamWriter closes its transport when garbage-collected, which
    would cut connections handed over to aiohttp."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.door.admit(self, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            # TLS offered h2 only to endpoint names (tls.py): every stream names its MicroVM.
            self.door.serve_h2(self, transport, b"")
            return
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, transport.close)  # slowloris

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.door.proven(self)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if self.buffer[: len(PREFACE)] == PREFACE[: len(self.buffer)]:
            if len(self.buffer) < len(PREFACE):
                return  # perhaps HTTP/2 with prior knowledge: the rest of its preface decides
            if self.timer is not None:
                self.timer.cancel()
            self.door.serve_h2(self, self.transport, bytes(self.buffer))
            return
        while self.buffer[:2] == b"\r\n":  # blank lines before a request line are allowed
            del self.buffer[:2]
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                self.transport.write(
                    simple_response(400, "Bad Request", b"request head too large", close=True)
                )
                self.transport.close()
            return
        if self.timer is not None:
            self.timer.cancel()
        head = bytes(self.buffer[: end + 4])
        if _BARE_CR_OR_LF.search(head):
            # Before routing: the Host this head seems to name depends on where its lines end.
            self.transport.write(
                simple_response(400, "Bad Request", b"bare CR or LF in the request head", close=True)
            )
            self.transport.close()
            return
        hosts = _HOST_LINE.findall(head)
        hostname = endpoint_hostname(hosts[0].decode("latin-1")) if len(hosts) == 1 else None
        if hostname is not None and not _is_shell(head):
            self.door.serve_endpoint(self, self.transport, hostname, bytes(self.buffer))
        else:
            self.door.proven(self)
            self.door.hand_to_app(self.transport, bytes(self.buffer))


class _ApiConnection(asyncio.Protocol):
    """The API's connections, served by aiohttp, which has no deadline for a request head or
    body: a client trickling a byte a second would hold a connection (and a file descriptor)
    forever. This wrapper follows where each request head starts and ends (Content-Length bodies;
    a chunked body or an upgrade ends the watch for that connection), closes a connection whose
    head takes longer than HEAD_TIMEOUT or whose body brings less than BODY_PROGRESS_BYTES in
    BODY_TIMEOUT, and one whose head has a bare CR or LF. Everything else is passed on to
    aiohttp unchanged."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.state = "head"  # "head", "body" or "off"
        self.head = bytearray()
        self.body_left = 0
        self.body_progress = 0  # body bytes since the body timer was last armed
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def data_received(self, data: bytes) -> None:
        if not self._watch(data):
            assert self.transport is not None
            self.transport.abort()  # aiohttp may be answering an earlier request: no 400 of ours
            return
        self.inner.data_received(data)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _arm_body_timer(self) -> None:
        self._stop_timer()
        self.body_progress = 0
        if self.transport is not None:
            self.timer = asyncio.get_running_loop().call_later(BODY_TIMEOUT, self.transport.abort)

    def _watch(self, data: bytes) -> bool:
        """Follow the request heads and bodies in data; False for a head that must not reach aiohttp."""
        view = memoryview(data)
        while view and self.state != "off":
            if self.state == "body":
                taken = min(self.body_left, len(view))
                self.body_left -= taken
                self.body_progress += taken
                view = view[taken:]
                if not self.body_left:
                    self._stop_timer()
                    self.state = "head"
                elif self.body_progress >= BODY_PROGRESS_BYTES:
                    self._arm_body_timer()  # progress: a new window
                continue
            start = len(self.head)
            self.head += view
            end = self.head.find(b"\r\n\r\n", max(start - 3, 0))
            if end < 0:
                if len(self.head) > MAX_HEAD_BYTES:
                    self.state = "off"  # aiohttp answers an oversized head itself
                elif self.timer is None and self.transport is not None:
                    # Armed only for a head that did not come whole: most do, and pay no timer.
                    self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self.transport.close)
                return True
            self._stop_timer()
            head, rest = bytes(self.head[: end + 4]).lower(), view[end + 4 - start :]
            self.head = bytearray()
            if _BARE_CR_OR_LF.search(head.lstrip(b"\r\n")):
                return False
            length = re.search(rb"\r\ncontent-length:[ \t]*([0-9]+)", head)
            if b"\r\ntransfer-encoding:" in head or b"\r\nupgrade:" in head:
                self.state = "off"
            elif length is not None and int(length.group(1)):
                self.state, self.body_left = "body", int(length.group(1))
                # Armed for every body, unlike the head timer: a body is where a slow client waits.
                self._arm_body_timer()
            view = rest
        return True


class FrontDoor:
    def __init__(
        self, app_server: Callable[[], asyncio.Protocol], backend: EndpointBackend, counters: Counters
    ) -> None:
        self.app_server = app_server  # aiohttp's protocol factory (web.Server)
        self.backend = backend
        self.counters = counters
        self._connections: set[asyncio.Task[None]] = set()
        # Unproven connections, oldest first (a dict keeps insertion order).
        self._unproven: dict[object, asyncio.Transport] = {}

    def protocol(self) -> asyncio.Protocol:
        return _FirstHead(self)

    def admit(self, key: object, transport: asyncio.Transport) -> None:
        """A new, unproven connection: room is made by closing the oldest unproven ones."""
        while len(self._unproven) >= MAX_UNAUTHENTICATED:
            oldest = next(iter(self._unproven))
            # abort, not close: no TLS goodbye or buffered bytes keep the descriptor open.
            self._unproven.pop(oldest).abort()
        self._unproven[key] = transport

    def proven(self, key: object) -> None:
        """The connection completed a head (API, shell), passed a token check, or ended."""
        self._unproven.pop(key, None)

    @property
    def unproven_count(self) -> int:
        return len(self._unproven)

    def hand_to_app(self, transport: asyncio.Transport, received: bytes) -> None:
        protocol = _ApiConnection(self.app_server())
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(received)

    def serve_endpoint(
        self, key: object, transport: asyncio.Transport, hostname: str, received: bytes
    ) -> None:
        reader, writer = self._streams(transport, received)
        connection = EndpointConnection(
            self.backend, hostname, reader, writer, self.counters, authenticated=lambda: self.proven(key)
        )
        self._track(key, asyncio.get_running_loop().create_task(self._serve(connection)))

    def serve_h2(self, key: object, transport: asyncio.Transport, received: bytes) -> None:
        """A connection that speaks HTTP/2: unproven until one of its streams passes a token check."""
        reader, writer = self._streams(transport, b"")
        relay = H2EndpointRelay(
            self.backend,
            self.counters,
            authenticated=lambda: self.proven(key),
            secure=transport.get_extra_info("ssl_object") is not None,
        )
        connection = H2ServerConnection(reader, writer, relay.handle, HEAD_TIMEOUT, on_close=relay.close)
        self._track(key, asyncio.get_running_loop().create_task(connection.serve(received)))

    def _streams(
        self, transport: asyncio.Transport, received: bytes
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Asyncio streams over a transport taken from the first-head protocol."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD_BYTES, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if received:
            protocol.data_received(received)
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    def _track(self, key: object, task: asyncio.Task[None]) -> None:
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        # The connection stays unproven until a token passes; it leaves the count when it ends.
        task.add_done_callback(lambda _task: self.proven(key))

    async def _serve(self, connection: EndpointConnection) -> None:
        try:
            head = await read_head(connection.reader)
        except ProtocolError:
            connection.writer.close()
            return
        if head is not None:
            await connection.serve(head)
        else:
            connection.writer.close()

    async def close(self) -> None:
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)


async def start_front_door(
    runner: web.AppRunner, backend: EndpointBackend, counters: Counters, host: str, port: int
) -> tuple[asyncio.Server, FrontDoor]:
    server = runner.server
    assert server is not None
    door = FrontDoor(server, backend, counters)
    listener = await asyncio.get_running_loop().create_server(door.protocol, host, port, reuse_address=True)
    return listener, door
