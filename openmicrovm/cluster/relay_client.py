"""The replica's end of the relay: a connection into an app, or a shell, of a MicroVM that runs on
another host, through that host's agent (see relay_protocol.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlsplit

from openmicrovm.cluster import relay_protocol as wire
from openmicrovm.logs.store import LogChunk
from openmicrovm.runtime.driver import DriverError, PortNotListening, PtySession, TooManyConnections

CONNECT_SECONDS = 5.0


def agent_address(advertise_url: str) -> tuple[str, int]:
    parts = urlsplit(advertise_url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise DriverError(f"the host agent's address {advertise_url!r} is not http://IP:PORT")
    return parts.hostname, parts.port


async def open_relay(
    advertise_url: str, secret: bytes, request: dict[str, Any]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to an agent, prove the secret, send `request`; the stream once the agent said yes.
    Raises PortNotListening, TooManyConnections, or DriverError with the agent's words."""
    reader, writer, _ = await _request(advertise_url, secret, request)
    return reader, writer


async def _request(
    advertise_url: str, secret: bytes, request: dict[str, Any]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
    host, port = agent_address(advertise_url)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_SECONDS)
    except (OSError, TimeoutError) as error:
        raise DriverError(f"the MicroVM's host agent at {advertise_url} cannot be reached: {error}") from None
    try:
        greeting = await wire.read_line(reader)
        if not greeting.startswith(wire.GREETING):
            raise wire.RelayError(f"not an openmicrovm agent: {greeting[:40]!r}")
        challenge = greeting[len(wire.GREETING) :].decode()
        request = dict(request, nonce=wire.new_challenge())
        signed = dict(request, proof=wire.proof(secret, challenge, request))
        writer.write(wire.json_line(signed))
        answer = await wire.read_json(reader)
    except (wire.RelayError, UnicodeDecodeError, ConnectionError, OSError) as error:
        writer.transport.abort()
        raise DriverError(f"the host agent at {advertise_url} broke off: {error}") from None
    error = answer.get("error")
    if error != wire.DENIED and not wire.answer_proven(secret, challenge, request["nonce"], answer):
        writer.transport.abort()
        raise DriverError(
            f"whatever answers at {advertise_url} could not prove the cluster secret: it is not a host "
            "agent of this cluster"
        )
    if answer.get("ok") is True:
        return reader, writer, answer
    writer.transport.abort()
    message = str(answer.get("message") or error)
    if error == wire.PORT_NOT_LISTENING:
        raise PortNotListening(message)
    if error == wire.TOO_MANY_CONNECTIONS:
        raise TooManyConnections(message)
    if error == wire.DENIED:
        message = f"the host agent at {advertise_url} refused this server's proof: is the cluster secret the same on both?"
    raise DriverError(message)


async def read_remote_log(advertise_url: str, secret: bytes, stream: str, after: int, limit: int) -> LogChunk:
    """A chunk of a log kept on another host."""
    request = {"op": "logs", "stream": stream, "after": after, "limit": limit}
    reader, writer, answer = await _request(advertise_url, secret, request)
    try:
        body = await reader.read()  # the agent closes the connection after the chunk
    finally:
        writer.transport.abort()
    if len(body) != answer.get("bytes"):
        raise DriverError(
            f"the host agent at {advertise_url} sent {len(body)} of {answer.get('bytes')} bytes of a log"
        )
    try:
        return LogChunk(**json.loads(body))
    except (ValueError, TypeError) as error:
        raise DriverError(
            f"the host agent at {advertise_url} sent an unreadable log chunk: {error}"
        ) from None


class RelayedPty(PtySession):
    """A shell on another host, as if it were local."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._status: int | None = None

    async def read(self) -> bytes:
        while True:
            try:
                received = await wire.read_frame(self._reader)
            except (wire.RelayError, ConnectionError, OSError):
                received = None
            if received is None:
                return b""
            kind, payload = received
            if kind == wire.FRAME_DATA:
                return payload
            if kind == wire.FRAME_EXIT:
                with contextlib.suppress(ValueError):
                    self._status = int(payload)
                return b""

    async def write(self, data: bytes) -> None:
        self._writer.write(wire.frame(wire.FRAME_DATA, data))
        await self._writer.drain()

    async def resize(self, rows: int, cols: int) -> None:
        self._writer.write(wire.frame(wire.FRAME_RESIZE, json.dumps([rows, cols]).encode()))
        await self._writer.drain()

    async def wait(self) -> int:
        # The exit frame comes after the last output, which read() has consumed by now.
        return self._status if self._status is not None else -1

    async def close(self) -> None:
        self._writer.transport.abort()
