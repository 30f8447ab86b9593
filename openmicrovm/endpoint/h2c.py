"""`X-aws-proxy-force-h2: true` (spec §5.3): the client speaks HTTP/1.1 to the endpoint, the app
speaks cleartext HTTP/2 (h2c, prior knowledge). One request becomes one stream on a connection
of its own to the app (h2_upstream.py); the response comes back to the client as HTTP/1.1,
chunked, as it arrives. An app that does not speak HTTP/2 gets the client a 502, as on AWS."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus

import h2.exceptions

from openmicrovm.endpoint.h2_upstream import AppEvent, H2Upstream, Headers
from openmicrovm.endpoint.http1 import (
    BodyProgress,
    BodyTimeout,
    Framing,
    Head,
    ProtocolError,
    chunked_pieces,
    exactly,
)

# Headers that mean something only to one HTTP/1.1 hop, and that HTTP/2 forbids ("te" but for
# "te: trailers", which gRPC sends).
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host"}


class UpstreamNotH2(Exception):
    """The app did not answer in HTTP/2."""


def h2_request_headers(head: Head, authority: str) -> Headers:
    """A request head already stripped for the app (HTTP/1.1, or an HTTP/2 stream's as a Head)
    as HTTP/2 request headers to the app."""
    method, path, _ = head.start
    headers: Headers = [
        (b":method", method.encode("latin-1")),
        (b":scheme", b"http"),
        (b":authority", authority.encode("latin-1")),
        (b":path", path.encode("latin-1")),
    ]
    for name, value in head.headers:
        lowered = name.lower()
        if lowered in _HOP_BY_HOP or (lowered == "te" and value.strip().lower() != "trailers"):
            continue
        headers.append((lowered.encode("latin-1"), value.encode("latin-1")))
    return headers


async def decoded_body(
    framing: Framing, reader: asyncio.StreamReader, progress: BodyProgress | None = None
) -> AsyncIterator[bytes]:
    """A body's bytes without its HTTP/1.1 framing (checked as strictly as a relayed one: the
    same parser); a body that lasts until the connection closes is read to its end."""
    if framing.kind == "length":
        async for data in exactly(reader, framing.length, "a body (before its Content-Length)", progress):
            yield data
    elif framing.kind == "chunked":
        async for piece, is_data in chunked_pieces(reader, progress):
            if is_data:
                yield piece
    elif framing.kind == "close":
        while data := await reader.read(256 * 1024):
            yield data


class ForcedH2:
    """One HTTP/1.1 request over a fresh h2c connection to the app."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.upstream = H2Upstream(reader, writer)
        self.responded = False  # whether the client has been sent a response head
        # Why the client's body could not be read, if it could not: the exchange ends with it
        # rather than waiting for an app that waits for the rest of the body.
        self.body_error: ProtocolError | BodyTimeout | None = None

    async def run(
        self,
        head: Head,
        authority: str,
        body: AsyncIterator[bytes] | None,
        client: asyncio.StreamWriter,
        count: Callable[[bytes], None],
    ) -> int:
        """Send the request, relay the response to the client as HTTP/1.1; its status."""
        self.upstream.start()
        stream_id, events = self.upstream.open_stream(
            h2_request_headers(head, authority), end_stream=body is None
        )
        sending = (
            asyncio.ensure_future(self._send_body(body, stream_id, events)) if body is not None else None
        )
        try:
            return await self._respond(head.start[0], events, stream_id, client, count)
        finally:
            if sending is not None:
                sending.cancel()
            self.upstream.close()

    async def _send_body(
        self, body: AsyncIterator[bytes], stream_id: int, events: asyncio.Queue[AppEvent | None]
    ) -> None:
        try:
            async for piece in body:
                await self.upstream.send_data(stream_id, piece)
            await self.upstream.send_data(stream_id, b"", end_stream=True)
        except (ProtocolError, BodyTimeout) as error:
            self.body_error = error
            events.put_nowait(None)
        except (ConnectionError, OSError, h2.exceptions.StreamClosedError):
            pass  # the app's side ended: the response's relay sees it

    async def _next(self, events: asyncio.Queue[AppEvent | None]) -> AppEvent | None:
        event = await events.get()
        if self.body_error is not None:
            raise self.body_error
        return event

    async def _respond(
        self,
        method: str,
        events: asyncio.Queue[AppEvent | None],
        stream_id: int,
        client: asyncio.StreamWriter,
        count: Callable[[bytes], None],
    ) -> int:
        while True:
            first = await self._next(events)
            if first is None or first.kind != "headers" or first.headers is None:
                raise UpstreamNotH2("the app did not answer with HTTP/2 response headers")
            status = dict(first.headers).get(b":status", b"200").decode("latin-1")
            if not status.startswith("1"):
                break  # interim responses are not passed on
        # No body follows a HEAD, 204 or 304: no framing either (a chunked terminator would be
        # read as the start of the next response).
        bodyless = method == "HEAD" or status in ("204", "304")
        lines = []
        for name, value in first.headers:
            # The body is re-framed as chunked: the app's Content-Length must not go with it (a
            # client is never sent both, RFC 9112 §6.3).
            if name.startswith(b":") or name.decode("latin-1") in _HOP_BY_HOP:
                continue
            if name == b"content-length" and not bodyless:
                continue
            lines.append(b"%s: %s" % (name, value))
        if not bodyless:
            lines.append(b"transfer-encoding: chunked")
        response = b"HTTP/1.1 %s %s\r\n" % (status.encode(), _reason(status).encode()) + b"".join(
            line + b"\r\n" for line in lines
        )
        response += b"\r\n"
        client.write(response)
        count(response)
        self.responded = True
        if bodyless:
            await client.drain()
            return int(status)
        ended = first.end_stream
        while not ended:
            event = await self._next(events)
            if event is None or event.kind == "reset":
                # No last chunk: the client must not take a cut body for a whole one.
                raise ProtocolError("the app's HTTP/2 stream ended before its response did")
            if event.kind == "data" and event.data:
                framed = b"%x\r\n%s\r\n" % (len(event.data), event.data)
                client.write(framed)
                count(framed)
                await client.drain()
                self.upstream.acknowledge(stream_id, event.flow_controlled_length)
            ended = event.kind in ("end", "trailers")
        client.write(b"0\r\n\r\n")
        with contextlib.suppress(ConnectionError, OSError):
            await client.drain()
        return int(status)


def _reason(status: str) -> str:
    try:
        return HTTPStatus(int(status)).phrase
    except ValueError:
        return "Status"
