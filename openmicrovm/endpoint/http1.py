"""Just enough HTTP/1.1 for a transparent proxy: read a message head, find where its body ends, and
relay the body as it arrives, never holding more than one chunk in memory.

Parsing is strict where lenience enables request smuggling: a message with both Content-Length
and Transfer-Encoding, conflicting Content-Lengths, a non-chunked Transfer-Encoding on a request,
line folding, a bare CR or LF anywhere in a head (request line included), a chunk whose data is not
followed by CRLF, or bytes that are not allowed in a header or trailer is refused. Whatever a
lenient parser behind us (the app's) would read differently from us must never be forwarded.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

MAX_HEAD_BYTES = 64 * 1024
RELAY_CHUNK = 256 * 1024
# A request body must bring BODY_PROGRESS_BYTES (or its end) within every BODY_TIMEOUT seconds
# spent waiting on the client, so a client that sends a head and then trickles or stops its
# body holds no connection (here and into the MicroVM) for long. 8 KiB per 30 s is ~270 bytes/s,
# about the minimum request body rate that Kestrel and similar servers enforce by default; any
# real client, however slow its link, sends faster. Long-lived client-to-app streams belong in a
# WebSocket, which is a tunnel and is not bound by this.
BODY_TIMEOUT = 30.0
BODY_PROGRESS_BYTES = 8 * 1024
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# A request-target is visible characters only: a CR, LF, NUL, other control byte or a space in it
# could end the line early for a parser behind us (a bare LF is a line end to many).
_REQUEST_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
# Chunk extensions are kept (they are forwarded), but with no control bytes.
CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[\t\x20-\x7e\x80-\xff]*)?")


class ProtocolError(Exception):
    """The peer sent something that is not acceptable HTTP/1.1 (answered 400 to a client)."""


class BodyTimeout(Exception):
    """A request body stopped making progress (answered 408 to a client, connection closed)."""


@dataclass
class BodyProgress:
    """The progress rule of one request body (see BODY_TIMEOUT). Only time spent waiting for the
    client counts: time the app takes to accept what was read is backpressure, not slowness."""

    timeout: float = BODY_TIMEOUT
    progress_bytes: int = BODY_PROGRESS_BYTES
    waited: float = 0.0  # seconds spent waiting on the client since the last progress
    received: int = 0  # bytes received since the last progress

    async def read(self, reading: Awaitable[bytes]) -> bytes:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(max(self.timeout - self.waited, 0.0)):
                data = await reading
        except TimeoutError:
            raise BodyTimeout(
                f"the request body brought less than {self.progress_bytes} bytes in {self.timeout:g} s"
            ) from None
        self.waited += loop.time() - started
        self.received += len(data)
        if self.received >= self.progress_bytes:
            self.waited, self.received = 0.0, 0
        return data


async def _bounded(reading: Awaitable[bytes], progress: BodyProgress | None) -> bytes:
    return await (reading if progress is None else progress.read(reading))


@dataclass
class Head:
    start: tuple[str, str, str]  # request: method, target, version; response: version, status, reason
    headers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]

    def remove(self, predicate: Callable[[str], bool]) -> None:
        self.headers = [(k, v) for k, v in self.headers if not predicate(k.lower())]

    def connection_tokens(self) -> set[str]:
        return {t.strip().lower() for v in self.get_all("connection") for t in v.split(",") if t.strip()}

    def serialize(self) -> bytes:
        lines = [" ".join(self.start)] + [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The bytes of one message head (up to the blank line), or None at a clean end of stream."""
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if not error.partial.strip():
            return None
        raise ProtocolError("the connection closed in the middle of a message head") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"message head larger than {MAX_HEAD_BYTES} bytes") from None
    # Tolerate blank lines before a request line (RFC 9112 §2.2).
    return data.lstrip(b"\r\n")


def parse_head(data: bytes, request: bool) -> Head:
    lines = data[:-4].split(b"\r\n")
    start = lines[0].split(b" ", 2)
    if len(start) != 3:
        raise ProtocolError(f"malformed start line {lines[0][:100]!r}")
    if request:
        method, target, version = start
        if (
            not _TOKEN.fullmatch(method)
            or not _REQUEST_TARGET.fullmatch(target)
            or version not in (b"HTTP/1.1", b"HTTP/1.0")
        ):
            raise ProtocolError(f"malformed request line {lines[0][:100]!r}")
    else:
        version, status, reason = start
        if (
            not version.startswith(b"HTTP/1.")
            or not status.isdigit()
            or len(status) != 3
            or not _FIELD_VALUE.fullmatch(reason)
        ):
            raise ProtocolError(f"malformed status line {lines[0][:100]!r}")
    head = Head(tuple(part.decode("latin-1") for part in start))  # type: ignore[arg-type]
    for line in lines[1:]:
        name, value = _field_line(line)
        head.headers.append((name.decode("latin-1"), value.decode("latin-1")))
    return head


def _field_line(line: bytes) -> tuple[bytes, bytes]:
    """A header (or trailer) line's name and value, refusing anything a parser could read otherwise."""
    if line[:1] in (b" ", b"\t"):
        raise ProtocolError("obsolete line folding in a header")
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise ProtocolError(f"malformed header line {line[:100]!r}")
    value = value.strip(b" \t")
    if not _FIELD_VALUE.fullmatch(value):
        raise ProtocolError(f"forbidden bytes in header {name.decode('latin-1')}")
    return name, value


def drop_conflicting_length(head: Head) -> bool:
    """RFC 9112 §6.3: a message with both Transfer-Encoding and Content-Length is framed by its
    Transfer-Encoding, and an intermediary that forwards it must remove the Content-Length first.
    A client must never be handed both (the pair is how responses are split and requests
    smuggled between two parsers that pick different ones). True when one was dropped."""
    if head.get_all("transfer-encoding") and head.get_all("content-length"):
        head.remove(lambda name: name == "content-length")
        return True
    return False


@dataclass(frozen=True)
class Framing:
    """How a body ends: after `length` bytes, at the last chunk, or when the sender closes."""

    kind: str  # "none", "length", "chunked", "close"
    length: int = 0


def request_framing(head: Head) -> Framing:
    encodings = head.get_all("transfer-encoding")
    lengths = head.get_all("content-length")
    if encodings:
        if lengths:
            raise ProtocolError("both Transfer-Encoding and Content-Length")
        codings = [c.strip().lower() for v in encodings for c in v.split(",")]
        if codings != ["chunked"]:
            raise ProtocolError(f"unsupported Transfer-Encoding {', '.join(codings)}")
        return Framing("chunked")
    if lengths:
        return Framing("length", _content_length(lengths))
    return Framing("none")


def response_framing(head: Head, request_method: str) -> Framing:
    status = int(head.start[1])
    if request_method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return Framing("none")
    encodings = head.get_all("transfer-encoding")
    if encodings:
        codings = [c.strip().lower() for v in encodings for c in v.split(",")]
        return Framing("chunked") if codings[-1] == "chunked" else Framing("close")
    lengths = head.get_all("content-length")
    if lengths:
        return Framing("length", _content_length(lengths))
    return Framing("close")


def _content_length(values: list[str]) -> int:
    parsed = {v.strip() for value in values for v in value.split(",")}
    value = next(iter(parsed))
    if len(parsed) != 1 or not (value.isascii() and value.isdigit()):
        raise ProtocolError(f"invalid Content-Length {values!r}")
    return int(value)


Sink = Callable[[bytes], None]


class ByteWriter(Protocol):
    """Where a body is relayed to: a StreamWriter, or a HeldHead in front of one."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class HeldHead:
    """A response head held back for one turn of the event loop. A body that has already
    arrived leaves with it in one send (one segment, one wake-up of the client: sends were most
    of the endpoint's time per request); a body still on its way never holds the head back."""

    def __init__(self, writer: asyncio.StreamWriter, head: bytes) -> None:
        self._writer = writer
        self._held = head
        self._flushing = asyncio.get_running_loop().call_soon(self.flush)

    def write(self, data: bytes) -> None:
        held, self._held = self._held, b""
        self._flushing.cancel()
        self._writer.write(held + data if held else data)

    def flush(self) -> None:
        """Send the head now if it is still held (idempotent)."""
        self._flushing.cancel()
        if self._held:
            held, self._held = self._held, b""
            self._writer.write(held)

    async def drain(self) -> None:
        await self._writer.drain()


async def exactly(
    reader: asyncio.StreamReader, size: int, what: str, progress: BodyProgress | None = None
) -> AsyncIterator[bytes]:
    """The next `size` bytes, as they arrive; ProtocolError if the stream ends first."""
    remaining = size
    while remaining:
        data = await _bounded(reader.read(min(remaining, RELAY_CHUNK)), progress)
        if not data:
            raise ProtocolError(f"the connection closed inside {what}")
        remaining -= len(data)
        yield data


async def chunked_pieces(
    reader: asyncio.StreamReader, progress: BodyProgress | None = None
) -> AsyncIterator[tuple[bytes, bool]]:
    """A chunked body, checked strictly, as it arrives: (wire bytes, True for chunk data) for
    every size line, piece of data, CRLF after data, last-chunk line and trailer line, in order.
    A chunk whose data is not followed by CRLF ends it with a ProtocolError: a parser behind us
    that skips whatever follows the data would find a request hidden there."""
    while True:
        line = await _line(reader, progress)
        match = CHUNK_SIZE.fullmatch(line[:-2])
        if match is None:
            raise ProtocolError(f"malformed chunk size line {line[:40]!r}")
        yield line, False
        size = int(match.group(1), 16)
        if size == 0:
            break
        async for data in exactly(reader, size, "a chunk", progress):
            yield data, True
        try:
            end = await _bounded(reader.readexactly(2), progress)
        except asyncio.IncompleteReadError:
            raise ProtocolError("the connection closed inside a chunk") from None
        if end != b"\r\n":
            raise ProtocolError("a chunk's data is not followed by CRLF")
        yield end, False
    while (trailer := await _line(reader, progress)) != b"\r\n":
        _field_line(trailer[:-2])
        yield trailer, False
    yield trailer, False


async def relay_body(
    framing: Framing,
    reader: asyncio.StreamReader,
    writer: ByteWriter,
    counted: Sink,
    progress: BodyProgress | None = None,
) -> None:
    """Copy one body from reader to writer as it arrives, bytes unchanged (chunked stays
    chunked), calling counted(chunk) for every piece (idle accounting, metrics). With `progress`
    (request bodies), a sender that stops or trickles gets a BodyTimeout."""
    if framing.kind == "none":
        return
    if framing.kind == "length":
        async for data in exactly(reader, framing.length, "a body (before its Content-Length)", progress):
            await _send(writer, data, counted)
        return
    if framing.kind == "close":
        while data := await _bounded(reader.read(RELAY_CHUNK), progress):
            await _send(writer, data, counted)
        return
    async for piece, _is_data in chunked_pieces(reader, progress):
        await _send(writer, piece, counted)


async def _line(reader: asyncio.StreamReader, progress: BodyProgress | None) -> bytes:
    try:
        return await _bounded(reader.readuntil(b"\r\n"), progress)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise ProtocolError("malformed or truncated chunked body") from None


async def _send(writer: ByteWriter, data: bytes, counted: Sink) -> None:
    writer.write(data)
    counted(data)
    await writer.drain()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counted: Sink) -> None:
    """Copy bytes one way until end of stream (tunnels: WebSocket, h2c after an upgrade), then
    pass the end on. A cancelled pipe passes nothing on: whoever cancelled it decides how the
    connection ends (a token that expired ends a WebSocket with a close frame of ours)."""
    try:
        while data := await reader.read(RELAY_CHUNK):
            await _send(writer, data, counted)
    except (ConnectionError, OSError):
        pass
    if writer.can_write_eof():
        try:
            writer.write_eof()
        except (ConnectionError, OSError):
            pass


def simple_response(status: int, reason: str, body: bytes = b"", close: bool = False) -> bytes:
    headers = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}"]
    if body:
        headers.append("Content-Type: text/plain; charset=utf-8")
    if close:
        headers.append("Connection: close")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body
