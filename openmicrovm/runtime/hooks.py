"""Calling the app's lifecycle hooks (spec §4.5, §5.7) the way the in-guest caller does:

    POST /aws/lambda-microvms/runtime/v1/<name> HTTP/1.1
    Host: localhost:<port>

over driver.connect, so the app sees the request arrive from inside its sandbox. Each way a call
can fail has its own exception, so the layers above can write the spec's exact stateReason.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from .driver import DriverError, PortNotListening, Sandbox, SandboxDriver

HOOK_PATH = "/aws/lambda-microvms/runtime/v1/"
MAX_HOOK_RESPONSE = 1024 * 1024


class HookError(DriverError):
    """A hook call failed; the subclasses say how."""


class HookConnectionRefused(HookError):
    """Nothing listens on the hook port."""


class HookTimeout(HookError):
    """The app did not answer within the hook's timeout."""


class HookMalformedReply(HookError):
    """No valid HTTP/1.x response: garbage, a truncated reply, or a connection that broke midway."""


@dataclass(frozen=True)
class HookResult:
    status: int
    body: bytes


def build_request(port: int, name: str, body: bytes | None) -> bytes:
    lines = [
        f"POST {HOOK_PATH}{name} HTTP/1.1",
        f"Host: localhost:{port}",
        "Connection: close",
        f"Content-Length: {len(body or b'')}",
    ]
    if body is not None:
        lines.append("Content-Type: application/json")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def _read_response(reader: asyncio.StreamReader) -> HookResult:
    status_line = await reader.readline()
    if not status_line:
        raise HookMalformedReply("the app closed the connection without answering")
    parts = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise HookMalformedReply(f"the app answered with an invalid status line: {status_line[:100]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if not line:
            raise HookMalformedReply("the app closed the connection in the middle of the headers")
        if line in (b"\r\n", b"\n"):
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise HookMalformedReply(f"the app sent an invalid header line: {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise HookMalformedReply(f"invalid Content-Length {headers['content-length']!r}") from None
        if length < 0 or length > MAX_HOOK_RESPONSE:
            raise HookMalformedReply(f"Content-Length {length} is out of range")
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise HookMalformedReply("the app closed the connection before sending the whole body") from None
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:
        body = await reader.read(MAX_HOOK_RESPONSE)
    return HookResult(status, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readline()
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise HookMalformedReply(f"invalid chunk size line {size_line[:50]!r}") from None
        if size == 0:
            # Trailers end with an empty line.
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            return bytes(body)
        if len(body) + size > MAX_HOOK_RESPONSE:
            raise HookMalformedReply("the hook response body is too large")
        try:
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            raise HookMalformedReply("the app closed the connection in the middle of a chunk") from None


async def call_hook(
    driver: SandboxDriver, sandbox: Sandbox, port: int, name: str, body: bytes | None, timeout: float
) -> HookResult:
    """POST the hook and return its status and body. Raises HookConnectionRefused,
    HookTimeout or HookMalformedReply; other DriverErrors mean the sandbox itself is unreachable."""

    async def exchange() -> HookResult:
        try:
            reader, writer = await driver.connect(sandbox, port)
        except PortNotListening as error:
            raise HookConnectionRefused(str(error)) from None
        try:
            writer.write(build_request(port, name, body))
            await writer.drain()
            return await _read_response(reader)
        except (asyncio.LimitOverrunError, ValueError) as error:
            raise HookMalformedReply(f"the {name} hook response could not be parsed: {error}") from None
        except ConnectionError as error:
            raise HookMalformedReply(
                f"the connection to the {name} hook broke before a full reply: {error}"
            ) from None
        finally:
            writer.close()
            with contextlib.suppress(OSError, DriverError):
                await writer.wait_closed()

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except TimeoutError:
        raise HookTimeout(f"the {name} hook did not answer within {timeout:g} s") from None
