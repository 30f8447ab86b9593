"""Just enough HTTP/1.1 for a transparent proxy: read a message head, find where its body ends, and
relay the body as it arrives, never holding more than one chunk in memory.

Parsing is strict where lenience enables request smuggling: a message with both Content-Length
and Transfer-Encoding, conflicting Content-Lengths, a non-chunked Transfer-Encoding on a request,
line folding, or bytes that are not allowed in a header is refused.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

MAX_HEAD_BYTES = 64 * 1024
RELAY_CHUNK = 256 * 1024
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[^\r\n]*)?")


class ProtocolError(Exception):
    """The peer sent something that is not acceptable HTTP/1.1 (answered 400 to a client)."""


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
            or not target
            or b" " in target
            or version not in (b"HTTP/1.1", b"HTTP/1.0")
        ):
            raise ProtocolError(f"malformed request line {lines[0][:100]!r}")
    else:
        version, status, _reason = start
        if not version.startswith(b"HTTP/1.") or not status.isdigit() or len(status) != 3:
            raise ProtocolError(f"malformed status line {lines[0][:100]!r}")
    head = Head(tuple(part.decode("latin-1") for part in start))  # type: ignore[arg-type]
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError("obsolete line folding in a header")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise ProtocolError(f"malformed header line {line[:100]!r}")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise ProtocolError(f"forbidden bytes in header {name.decode('latin-1')}")
        head.headers.append((name.decode("latin-1"), value.decode("latin-1")))
    return head


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


async def exactly(reader: asyncio.StreamReader, size: int, what: str) -> AsyncIterator[bytes]:
    """The next `size` bytes, as they arrive; ProtocolError if the stream ends first."""
    remaining = size
    while remaining:
        data = await reader.read(min(remaining, RELAY_CHUNK))
        if not data:
            raise ProtocolError(f"the connection closed inside {what}")
        remaining -= len(data)
        yield data


async def relay_body(
    framing: Framing,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    counted: Sink,
) -> None:
    """Copy one body from reader to writer as it arrives, bytes unchanged (chunked stays
    chunked), calling counted(chunk) for every piece (idle accounting, metrics)."""
    if framing.kind == "none":
        return
    if framing.kind == "length":
        async for data in exactly(reader, framing.length, "a body (before its Content-Length)"):
            await _send(writer, data, counted)
        return
    if framing.kind == "close":
        while data := await reader.read(RELAY_CHUNK):
            await _send(writer, data, counted)
        return
    while True:  # chunked: relay each size line, its data and CRLF; then trailers
        line = await _line(reader)
        match = CHUNK_SIZE.fullmatch(line[:-2])
        if match is None:
            raise ProtocolError(f"malformed chunk size line {line[:40]!r}")
        size = int(match.group(1), 16)
        await _send(writer, line, counted)
        if size == 0:
            while True:
                trailer = await _line(reader)
                await _send(writer, trailer, counted)
                if trailer == b"\r\n":
                    return
        async for data in exactly(reader, size + 2, "a chunk"):
            await _send(writer, data, counted)


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise ProtocolError("malformed or truncated chunked body") from None


async def _send(writer: asyncio.StreamWriter, data: bytes, counted: Sink) -> None:
    writer.write(data)
    counted(data)
    await writer.drain()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counted: Sink) -> None:
    """Copy bytes one way until end of stream (tunnels: WebSocket, h2c after an upgrade)."""
    try:
        while data := await reader.read(RELAY_CHUNK):
            await _send(writer, data, counted)
    except (ConnectionError, OSError):
        pass
    finally:
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
