"""TCP relays in the devcluster process.

Two uses of one mechanism: a forwarder puts moto's S3 server (which binds one address) on the
bridge address too, for the agents; the endpoint balancer hands each new client connection to the
next API replica in turn, skipping one that refuses connections, so that a test can kill a replica
and keep using the endpoint. A connection already relayed to a replica that dies is cut, as a load
balancer's would be: the client's retry opens a new one, which reaches a live replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

_CHUNK = 64 * 1024


class TcpRelay:
    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        upstreams: list[tuple[str, int]],
        connect_timeout: float = 2.0,
    ) -> None:
        if not upstreams:
            raise ValueError("a relay needs at least one upstream")
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.upstreams = upstreams
        self.connect_timeout = connect_timeout
        self._turn = itertools.count()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port it listens on (the one the kernel chose, when asked for 0)."""
        assert self._server is not None, "start() first"
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Python 3.11's wait_closed() does not wait for (nor end) open connections.
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            upstream = await self._connect_upstream()
            if upstream is None:
                client_writer.close()
                return
            await _relay(client_reader, client_writer, *upstream)
        except asyncio.CancelledError:
            client_writer.transport.abort()
        finally:
            self._connections.discard(task)

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The next upstream in turn that accepts a connection; None when none does."""
        first = next(self._turn)
        for offset in range(len(self.upstreams)):
            host, port = self.upstreams[(first + offset) % len(self.upstreams)]
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                return await asyncio.wait_for(asyncio.open_connection(host, port), self.connect_timeout)
        return None


async def _relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
) -> None:
    """Copy both directions until both have ended, or one fails: a reset on one side then resets the
    other (abort), where a clean end closes both once what is buffered is sent."""
    directions = [
        asyncio.create_task(_pipe(client_reader, upstream_writer)),
        asyncio.create_task(_pipe(upstream_reader, client_writer)),
    ]
    clean = False
    try:
        await asyncio.wait(directions, return_when=asyncio.FIRST_EXCEPTION)
        clean = all(direction.done() and direction.exception() is None for direction in directions)
    finally:
        for direction in directions:
            direction.cancel()
        await asyncio.gather(*directions, return_exceptions=True)
        for writer in (upstream_writer, client_writer):
            if clean:
                writer.close()
            else:
                writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction; pass its end on as a half-close, so that the other direction can still
    finish (a client may send its whole request, then EOF, then read the answer)."""
    while chunk := await reader.read(_CHUNK):
        writer.write(chunk)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
