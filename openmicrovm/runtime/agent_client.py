"""The host side of the guest agent's control protocol (documented in agent/protocol.h).

The constants below are the host's copies of values in agent/protocol.h; they stay plain Python,
and tests/runtime/test_agent_protocol.py fails when the two disagree."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

from .driver import DriverError, PortNotListening, PtySession, TooManyConnections

# Inside the sandbox the agent listens on this port of its interface address. An app cannot use
# it (on the same address or 0.0.0.0); it is outside Linux's ephemeral range, so outgoing
# connections never collide with it either.
AGENT_PORT = 65199
# How long to wait for the agent's answer line; above its CONNECT_TIMEOUT_MS, so that a CONNECT
# that times out inside the sandbox is answered ETIMEDOUT rather than cut off here.
REPLY_TIMEOUT = 10.0
# CONNECT relays one agent serves at once (its --max-relays, DEFAULT_MAX_RELAYS); one more is
# refused with EMAXCONN. Each relayed connection usually costs the app a thread; the agent itself
# spends no process on it (agent.c says why that matters under gVisor).
MAX_RELAYED_CONNECTIONS = 128
PROTOCOL_WORD = "OMV1"  # the first word of every request
MAX_REQUEST_LINE = 65536  # the agent answers a longer request line with E2BIG
_FRAME_HEADER = 5  # type byte and 4-byte big-endian length (FRAME_HEADER_SIZE)
_MAX_INPUT_FRAME = 16 * 1024  # what we put in one frame; the agent takes up to MAX_CLIENT_FRAME
_MAX_REPLY_LINE = 4096  # an answer line longer than this is an error; the agent's stay under MAX_ANSWER_LINE
_FRAME_DATA = b"d"
_FRAME_END = b"e"
_FRAME_EXIT = b"x"
_FRAME_RESIZE = b"r"
_FRAME_SIGNAL = b"k"
ERR_CONNECTION_REFUSED = "ECONNREFUSED"  # CONNECT: nothing listens on the port
ERR_TOO_MANY_RELAYS = "EMAXCONN"  # CONNECT: the agent relays as many connections as it takes
ERR_PROTOCOL = "EPROTO"  # a verb the agent does not know (an older agent)

SocketOpener = Callable[[], Awaitable[socket.socket]]


class AgentError(DriverError):
    """The agent answered ERR."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code


@dataclass(frozen=True)
class AgentAddress:
    """How to reach one sandbox's agent: a socket factory (it knows the namespace) and the secret."""

    open_socket: SocketOpener
    token: str


def request_line(token: str, verb: str, fields: list[tuple[str, str]] | None = None) -> bytes:
    words = [PROTOCOL_WORD, token, verb] + [f"{key}={quote(value, safe='')}" for key, value in fields or []]
    return (" ".join(words) + "\n").encode()


def parse_reply(line: bytes) -> dict[str, str]:
    text = line.decode(errors="replace").rstrip("\r\n")
    if text.startswith("OK"):
        values: dict[str, str] = {}
        for word in text.split()[1:]:
            key, _, value = word.partition("=")
            values[key] = value
        return values
    if text.startswith("ERR "):
        _, code, *message = text.split(" ", 2)
        raise AgentError(code, message[0] if message else code)
    raise DriverError(f"the sandbox agent sent an unexpected reply: {text[:200]!r}")


async def control(address: AgentAddress, verb: str, timeout: float = REPLY_TIMEOUT) -> dict[str, str]:
    """One request/reply exchange (STATUS, ABORT). We close first and wait for the agent to close
    too, so no connection of ours is left open inside the sandbox when this returns."""
    sock = await address.open_socket()
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(request_line(address.token, verb))
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line.endswith(b"\n"):
            raise DriverError("the sandbox agent closed the connection without answering")
        writer.write_eof()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(reader.read(), timeout)
        return parse_reply(line)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class _FramedProtocol(asyncio.StreamReaderProtocol):
    """Reads the agent's reply line, then turns its frames into plain stream data."""

    def __init__(self, reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(reader, loop=loop)
        self._reader = reader
        self._buffer = bytearray()
        self.reply: asyncio.Future[bytes] = loop.create_future()
        self.exit_status: asyncio.Future[int] = loop.create_future()
        self._ended = False
        self._transport_ref: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport_ref = transport
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self.reply.done():
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > _MAX_REPLY_LINE:
                    self._fail(DriverError("the sandbox agent sent an over-long reply"))
                return
            self.reply.set_result(bytes(self._buffer[: end + 1]))
            del self._buffer[: end + 1]
        buffer = self._buffer
        while len(buffer) >= _FRAME_HEADER:
            length = int.from_bytes(buffer[1:5], "big")
            if len(buffer) < _FRAME_HEADER + length:
                break
            kind = buffer[0]
            payload = bytes(buffer[_FRAME_HEADER : _FRAME_HEADER + length])
            del buffer[: _FRAME_HEADER + length]
            if kind == _FRAME_DATA[0]:
                if payload:
                    self._reader.feed_data(payload)
            elif kind == _FRAME_END[0]:
                self._ended = True
                self._reader.feed_eof()
            elif kind == _FRAME_EXIT[0]:
                self._ended = True
                if not self.exit_status.done():
                    self.exit_status.set_result(int(payload or b"-1"))
                self._reader.feed_eof()
            else:
                self._fail(DriverError(f"the sandbox agent sent an unknown frame type {kind}"))
                return

    def _fail(self, error: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(error)
        self._reader.set_exception(error)
        if self._transport_ref is not None:
            self._transport_ref.abort()  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        # The agent never closes first on a healthy connection; a bare FIN means it died.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        lost = exc or ConnectionResetError(
            "the connection to the sandbox ended (the sandbox may have stopped)"
        )
        if not self.reply.done():
            self.reply.set_exception(lost)
        if not self.exit_status.done():
            self.exit_status.set_exception(
                DriverError("the sandbox ended before the command exited (it may have run out of memory)")
            )
            self.exit_status.exception()  # retrieved here so an unawaited future does not warn
        if self._ended:
            super().connection_lost(None)
        else:
            super().connection_lost(lost)


async def _open_framed(
    address: AgentAddress, line: bytes, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, _FramedProtocol, dict[str, str]]:
    sock = await address.open_socket()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16, loop=loop)
    protocol = _FramedProtocol(reader, loop)
    try:
        transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
    except BaseException:
        sock.close()
        raise
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    try:
        writer.write(line)
        reply = await asyncio.wait_for(protocol.reply, timeout)
        return reader, writer, protocol, parse_reply(reply)
    except BaseException:
        writer.close()
        raise


async def open_port(
    address: AgentAddress, port: int, timeout: float = REPLY_TIMEOUT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to 127.0.0.1:port inside the sandbox, relayed by the agent."""
    try:
        reader, writer, _protocol, _ = await _open_framed(
            address, request_line(address.token, "CONNECT", [("port", str(port))]), timeout
        )
    except AgentError as error:
        if error.code == ERR_CONNECTION_REFUSED:
            raise PortNotListening(f"nothing in the sandbox accepts connections on port {port}") from None
        if error.code == ERR_TOO_MANY_RELAYS:
            raise TooManyConnections(
                f"the sandbox is relaying as many connections as it takes at once ({error})"
            ) from None
        raise
    return reader, writer


class AppWatch:
    """One WAIT request kept open: `answer` resolves to the STATUS fields once the app is no longer
    running, or fails when the connection ends first (an ABORT before a suspend, a dead sandbox,
    an agent too old to know WAIT: AgentError EPROTO)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.answer: asyncio.Task[dict[str, str]] = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> dict[str, str]:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise ConnectionResetError("the sandbox agent closed the WAIT connection")
        return parse_reply(line)

    async def close(self) -> None:
        self.answer.cancel()
        with contextlib.suppress(BaseException):
            await self.answer
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def watch_app(address: AgentAddress) -> AppWatch:
    """Ask the agent to answer once the app stops (WAIT); see AppWatch."""
    sock = await address.open_socket()
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(request_line(address.token, "WAIT"))
    return AppWatch(reader, writer)


class AgentPtySession(PtySession):
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: _FramedProtocol
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._protocol = protocol

    def _frame(self, kind: bytes, payload: bytes) -> bytes:
        return kind + len(payload).to_bytes(4, "big") + payload

    async def read(self) -> bytes:
        return await self._reader.read(65536)

    async def write(self, data: bytes) -> None:
        for start in range(0, len(data), _MAX_INPUT_FRAME):
            self._writer.write(self._frame(_FRAME_DATA, data[start : start + _MAX_INPUT_FRAME]))
        await self._writer.drain()

    async def resize(self, rows: int, cols: int) -> None:
        self._writer.write(self._frame(_FRAME_RESIZE, f"{int(rows)} {int(cols)}".encode()))
        await self._writer.drain()

    async def signal(self, signum: int) -> None:
        """Send a signal to the command's process group (e.g. SIGINT for Ctrl-C outside the tty)."""
        self._writer.write(self._frame(_FRAME_SIGNAL, str(int(signum)).encode()))
        await self._writer.drain()

    async def wait(self) -> int:
        return await asyncio.shield(self._protocol.exit_status)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, DriverError):
            await self._writer.wait_closed()


async def open_pty(
    address: AgentAddress,
    argv: list[str],
    env: dict[str, str],
    rows: int,
    cols: int,
    cwd: str = "/",
    uid: int | None = None,
    gid: int | None = None,
    timeout: float = REPLY_TIMEOUT,
) -> AgentPtySession:
    if not argv:
        raise DriverError("exec_pty needs a command")
    fields = [("rows", str(rows)), ("cols", str(cols)), ("cwd", cwd)]
    if uid is not None:
        fields.append(("uid", str(uid)))
    if gid is not None:
        fields.append(("gid", str(gid)))
    fields += [("arg", arg) for arg in argv]
    fields += [("env", f"{key}={value}") for key, value in env.items()]
    reader, writer, protocol, _ = await _open_framed(
        address, request_line(address.token, "PTY", fields), timeout
    )
    return AgentPtySession(reader, writer, protocol)
