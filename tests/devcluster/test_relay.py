"""The devcluster's TCP relay: the S3 forwarder and the endpoint balancer."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

from openmicrovm.devcluster.relay import TcpRelay


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def serve(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> asyncio.Server:
    return await asyncio.start_server(handler, "127.0.0.1", 0)


def port_of(server: asyncio.Server) -> int:
    return server.sockets[0].getsockname()[1]


async def reverse_everything(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads until the client's EOF, then answers the bytes reversed: needs the half-close relayed."""
    data = await reader.read()
    writer.write(data[::-1])
    await writer.drain()
    writer.close()


def test_forwarder_relays_bytes_both_ways_with_half_close() -> None:
    async def scenario() -> None:
        upstream = await serve(reverse_everything)
        relay = TcpRelay("127.0.0.1", 0, [("127.0.0.1", port_of(upstream))])
        await relay.start()
        try:
            payload = os.urandom(3 * 1024 * 1024)  # many chunks, so drain() and flow control run
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(payload)
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            assert answer == payload[::-1]
        finally:
            await relay.close()
            upstream.close()

    asyncio.run(scenario())


def test_balancer_takes_turns_and_skips_a_replica_that_is_down() -> None:
    async def scenario() -> None:
        async def named(name: bytes) -> asyncio.Server:
            async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(name)
                await writer.drain()
                writer.close()

            return await serve(answer)

        first, second = await named(b"first"), await named(b"second")
        dead = closed_port()
        relay = TcpRelay(
            "127.0.0.1",
            0,
            [("127.0.0.1", port_of(first)), ("127.0.0.1", dead), ("127.0.0.1", port_of(second))],
        )
        await relay.start()

        async def ask() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return answer

        try:
            answers = [await ask() for _ in range(6)]
            assert set(answers) == {b"first", b"second"}
            assert b"" not in answers  # the dead one never gets a connection
            first.close()
            await first.wait_closed()
            assert {await ask() for _ in range(4)} == {b"second"}
        finally:
            await relay.close()
            second.close()

    asyncio.run(scenario())


def test_a_connection_is_refused_when_no_upstream_is_up_and_close_ends_open_ones() -> None:
    async def scenario() -> None:
        relay = TcpRelay("127.0.0.1", 0, [("127.0.0.1", closed_port())])
        await relay.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed at once
        writer.close()

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # never answers

        upstream = await serve(hold)
        relay.upstreams[:] = [("127.0.0.1", port_of(upstream))]
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"ping")
        await writer.drain()
        await asyncio.sleep(0.2)
        await asyncio.wait_for(relay.close(), 10)  # does not wait for the open connection to end by itself
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            pass  # cut, as it should be
        writer.close()
        upstream.close()

    asyncio.run(scenario())
