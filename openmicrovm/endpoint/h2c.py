"""`X-aws-proxy-force-h2: true` (spec §5.3): the client speaks HTTP/1.1 to the endpoint, the app
speaks cleartext HTTP/2 (h2c, prior knowledge). One request becomes one HTTP/2 stream; the
response comes back to the client as HTTP/1.1, streamed. An app that does not speak HTTP/2 gets
the client a 502, as on AWS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from openmicrovm.endpoint.http1 import (
    RELAY_CHUNK,
    BodyProgress,
    BodyTimeout,
    Framing,
    Head,
    ProtocolError,
    chunked_pieces,
    exactly,
)

# Headers that mean something only to one HTTP/1.1 hop, and that HTTP/2 forbids.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", "te"}
STREAM = 1
# What the response relay cares about; settings, pings and window updates stay in the h2 machine.
_RELAYED = (
    h2.events.ResponseReceived,
    h2.events.DataReceived,
    h2.events.StreamEnded,
    h2.events.StreamReset,
    h2.events.ConnectionTerminated,
)


class UpstreamNotH2(Exception):
    """The app did not answer in HTTP/2."""


async def decoded_body(
    framing: Framing, reader: asyncio.StreamReader, progress: BodyProgress | None = None
) -> AsyncIterator[bytes]:
    """The request body's bytes, without HTTP/1.1 chunked framing (checked as strictly as a
    relayed one: the same parser)."""
    if framing.kind == "length":
        async for data in exactly(reader, framing.length, "a body (before its Content-Length)", progress):
            yield data
    elif framing.kind == "chunked":
        async for piece, is_data in chunked_pieces(reader, progress):
            if is_data:
                yield piece


class H2Exchange:
    """One request/response over a fresh h2c connection to the app."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="latin-1")
        )
        self.window_opened = asyncio.Event()
        self.events: asyncio.Queue[h2.events.Event | None] = asyncio.Queue()
        # Why the client's body could not be read, if it could not: the exchange ends with it
        # rather than waiting for an app that waits for the rest of the body.
        self.body_error: ProtocolError | BodyTimeout | None = None
        self.responded = False  # whether the client has been sent a response head

    def _flush(self) -> None:
        data = self.connection.data_to_send()
        if data:
            self.writer.write(data)

    async def _receive(self) -> None:
        """Feed the app's bytes to the HTTP/2 state machine; queue the events of our stream."""
        try:
            while data := await self.reader.read(RELAY_CHUNK):
                try:
                    events = self.connection.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    if isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                        self.window_opened.set()
                    if isinstance(event, h2.events.DataReceived):
                        self.connection.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    if isinstance(event, _RELAYED):
                        self.events.put_nowait(event)
                self._flush()
        finally:
            self.events.put_nowait(None)

    async def _next_event(self) -> h2.events.Event | None:
        event = await self.events.get()
        if self.body_error is not None:
            raise self.body_error
        return event

    async def _send_body(self, body: AsyncIterator[bytes]) -> None:
        try:
            await self._send_all(body)
        except (ProtocolError, BodyTimeout) as error:
            self.body_error = error
            self.events.put_nowait(None)

    async def _send_all(self, body: AsyncIterator[bytes]) -> None:
        async for piece in body:
            view = memoryview(piece)
            while view:
                window = min(
                    self.connection.local_flow_control_window(STREAM), self.connection.max_outbound_frame_size
                )
                if window <= 0:
                    self.window_opened.clear()
                    await self.window_opened.wait()
                    continue
                self.connection.send_data(STREAM, view[:window].tobytes())
                view = view[window:]
                self._flush()
                await self.writer.drain()
        self.connection.end_stream(STREAM)
        self._flush()

    async def run(
        self,
        head: Head,
        authority: str,
        body: AsyncIterator[bytes] | None,
        client: asyncio.StreamWriter,
        count: Callable[[bytes], None],
    ) -> None:
        """Send the request, relay the response to the client as HTTP/1.1 (chunked)."""
        self.connection.initiate_connection()
        method, target, _ = head.start
        headers = [(":method", method), (":path", target), (":scheme", "http"), (":authority", authority)]
        headers += [(name.lower(), value) for name, value in head.headers if name.lower() not in _HOP_BY_HOP]
        self.connection.send_headers(STREAM, headers, end_stream=body is None)
        self._flush()
        receiving = asyncio.ensure_future(self._receive())
        sending = asyncio.ensure_future(self._send_body(body)) if body is not None else None
        try:
            first = await self._next_event()
            if not isinstance(first, h2.events.ResponseReceived):
                raise UpstreamNotH2("the app did not answer with HTTP/2 response headers")
            status = "200"
            for name, value in first.headers:
                if name == ":status":
                    status = value
            # No body follows a HEAD, 204 or 304: no framing either (a chunked terminator
            # would be read as the start of the next response).
            bodyless = method == "HEAD" or status in ("204", "304")
            lines = []
            for name, value in first.headers:
                # The body is re-framed as chunked: the app's Content-Length must not go with it
                # (a client is never sent both, RFC 9112 §6.3).
                if name.startswith(":") or name in _HOP_BY_HOP or (name == "content-length" and not bodyless):
                    continue
                lines.append(f"{name}: {value}")
            if not bodyless:
                lines.append("transfer-encoding: chunked")
            response = f"HTTP/1.1 {status} {_reason(status)}\r\n" + "\r\n".join(lines) + "\r\n\r\n"
            client.write(response.encode("latin-1"))
            count(response.encode("latin-1"))
            self.responded = True
            if bodyless:
                await client.drain()
                return
            while (event := await self._next_event()) is not None:
                if isinstance(event, h2.events.DataReceived) and event.data:
                    framed = b"%x\r\n%s\r\n" % (len(event.data), event.data)
                    client.write(framed)
                    count(framed)
                    await client.drain()
                elif isinstance(
                    event, h2.events.StreamEnded | h2.events.StreamReset | h2.events.ConnectionTerminated
                ):
                    break
            client.write(b"0\r\n\r\n")
            await client.drain()
        finally:
            receiving.cancel()
            if sending is not None:
                sending.cancel()
            self.writer.close()


def _reason(status: str) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(int(status)).phrase
    except ValueError:
        return "Status"
