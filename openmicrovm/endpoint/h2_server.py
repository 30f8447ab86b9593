"""HTTP/2 from clients: TLS connections that chose `h2` by ALPN, and cleartext ones that open with
the HTTP/2 preface (h2c with prior knowledge).

Each stream is one request and passes every check an HTTP/1.1 request does (proxy.py): the
MicroVM its :authority names, the token and port headers of that stream, HTTP ingress, a hold
through PENDING or an auto-resume; the proxy's refusals (403, 429, 502, 503) are responses on that
stream alone. A stream then reaches the app (relay.py decides how):

- as HTTP/2, on one h2c connection per client connection and port, when the stream carries
  `X-aws-proxy-force-h2: true` (as on AWS) or is gRPC, which exists only over HTTP/2;
- as HTTP/1.1 otherwise, on a connection of its own that later streams may reuse.

Bounds against a misbehaving client, besides the library's own (frame sizes, header list size
64 KiB, a malformed frame ends the connection with GOAWAY): 100 streams at once (SETTINGS), a
client that resets streams faster than it lets them finish is sent GOAWAY ENHANCE_YOUR_CALM
(the "rapid reset" flood), and per-stream and per-connection windows bound what is buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from openmicrovm.endpoint.h2_upstream import CONNECTION_WINDOW, STREAM_WINDOW, FlowControlled, Headers
from openmicrovm.endpoint.http1 import RELAY_CHUNK, Head

log = logging.getLogger("openmicrovm.endpoint")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_CONCURRENT_STREAMS = 100
MAX_HEADER_LIST_SIZE = 64 * 1024
# Streams the client may reset before they finish, per RESET_WINDOW seconds, before the
# connection is refused as a rapid-reset flood (each stream costs a lookup and a task here).
MAX_EARLY_RESETS = 200
RESET_WINDOW = 10.0


class ClientStream:
    """One client stream, as the relay sees it: the request head, its body as it comes, and ways
    to answer on it."""

    def __init__(self, connection: H2ServerConnection, stream_id: int, head: Head, ended: bool) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.head = head
        self.body_ended = ended  # the client sent END_STREAM (no more DATA)
        self.has_body = not ended
        self.trailers: Headers = []
        self.responded = False
        self.finished = False  # the response ended, or the stream was reset
        self.task: asyncio.Task[None] | None = None
        self._pieces: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue()
        if ended:
            self._pieces.put_nowait(None)

    # -- the client's side --------------------------------------------------------------------
    def received(self, data: bytes, flow_controlled_length: int) -> None:
        self._pieces.put_nowait((data, flow_controlled_length))

    def ended(self) -> None:
        self.body_ended = True
        self._pieces.put_nowait(None)

    async def body(self) -> AsyncIterator[bytes]:
        """The request body's data as it comes; each piece is acknowledged (the client may send
        that much more) once the consumer asks for the next one, that is once it has sent it on."""
        while (item := await self._pieces.get()) is not None:
            data, length = item
            yield data
            self.connection.acknowledge(self.stream_id, length)

    def discard_body(self) -> None:
        """Give back the window of body data nobody will read (a refused stream's): unread, it
        would shrink the connection's window for good, and stall its other streams."""
        while not self._pieces.empty():
            item = self._pieces.get_nowait()
            if item is not None:
                self.connection.acknowledge(self.stream_id, item[1])

    # -- answering ------------------------------------------------------------------------------
    def send_headers(self, headers: Headers, end_stream: bool = False) -> None:
        self.responded = True
        self.connection.send_headers(self.stream_id, headers, end_stream)
        if end_stream:
            self.finished = True

    async def send_data(self, data: bytes, end_stream: bool = False) -> None:
        await self.connection.send_data(self.stream_id, data, end_stream)
        if end_stream:
            self.finished = True

    def reset(self, error_code: int = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        if not self.finished:
            self.finished = True
            self.connection.reset_stream(self.stream_id, error_code)


class H2ServerConnection(FlowControlled):
    """Serves one client connection that speaks HTTP/2. `handle(stream)` is a coroutine function
    run as a task per stream; the relay (h2_relay.py) answers on the stream."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handle: Callable[[ClientStream], Awaitable[None]],
        idle_timeout: float,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        super().__init__(h2.connection.H2Connection(config), writer)
        self.reader = reader
        self.handle = handle
        self.idle_timeout = idle_timeout  # with no stream open, the connection ends after this
        self.on_close = on_close
        self.streams: dict[int, ClientStream] = {}
        self._early_resets: list[float] = []

    async def serve(self, received: bytes) -> None:
        self.connection.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self.connection.initiate_connection()
        self.connection.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()
        try:
            data = received or await self._next_bytes()
            while data:
                if not self._feed(data):
                    break
                await self.writer.drain()
                data = await self._next_bytes()
        except (ConnectionError, OSError):
            pass
        finally:
            await self._close()

    async def _next_bytes(self) -> bytes:
        """The client's next bytes; b"" at its end, or after idle_timeout with no stream open
        (a kept-alive HTTP/1.1 connection gets as long), when a GOAWAY says goodbye."""
        if self.streams:
            return await self.reader.read(RELAY_CHUNK)
        try:
            async with asyncio.timeout(self.idle_timeout):
                return await self.reader.read(RELAY_CHUNK)
        except TimeoutError:
            self.connection.close_connection(h2.errors.ErrorCodes.NO_ERROR)
            self.flush()
            return b""

    def _feed(self, data: bytes) -> bool:
        """Hand the client's bytes to the HTTP/2 machine; False once the connection must end."""
        try:
            events = self.connection.receive_data(data)
        except h2.exceptions.ProtocolError as error:
            # h2 has queued a GOAWAY with the error's code: send it, then end.
            log.info("HTTP/2 client broke the protocol: %s", error)
            self.flush()
            return False
        for event in events:
            if not self._dispatch(event):
                self.flush()
                return False
        self.flush()
        return True

    def _dispatch(self, event: h2.events.Event) -> bool:
        if isinstance(event, h2.events.RequestReceived):
            self._start_stream(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.acknowledge(event.stream_id, event.flow_controlled_length)
            else:
                stream.received(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.ended()
        elif isinstance(event, h2.events.StreamReset):
            return self._client_reset(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.window_changed()
        elif isinstance(event, h2.events.ConnectionTerminated):
            return False
        return True

    def _start_stream(self, event: h2.events.RequestReceived) -> None:
        head = head_of(event.headers)
        stream = ClientStream(self, event.stream_id, head, ended=event.stream_ended is not None)
        self.streams[event.stream_id] = stream
        stream.task = asyncio.ensure_future(self._run_stream(stream))

    async def _run_stream(self, stream: ClientStream) -> None:
        try:
            await self.handle(stream)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, OSError, h2.exceptions.StreamClosedError):
            stream.reset()
        except Exception:
            log.exception("HTTP/2 stream %d failed", stream.stream_id)
            stream.reset()
        finally:
            stream.discard_body()
            stream.reset()  # a handler that returned without ending its stream
            if self.streams.pop(stream.stream_id, None) is not None and not stream.body_ended:
                # Answered before the client finished its body: it may stop sending (RFC 9113 §8.1).
                self.reset_stream(stream.stream_id, h2.errors.ErrorCodes.NO_ERROR)
            with contextlib.suppress(ConnectionError, OSError):
                self.flush()

    def _client_reset(self, stream_id: int) -> bool:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return True
        stream.finished = True  # nothing more may be sent on it
        if stream.task is not None:
            stream.task.cancel()
        now = time.monotonic()
        self._early_resets = [at for at in self._early_resets if now - at < RESET_WINDOW]
        self._early_resets.append(now)
        if len(self._early_resets) > MAX_EARLY_RESETS:
            log.warning(
                "HTTP/2 client reset %d streams in %g s: closing its connection",
                MAX_EARLY_RESETS,
                RESET_WINDOW,
            )
            self.connection.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            return False
        return True

    # -- sending, for the streams ---------------------------------------------------------------
    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        if self.closed:
            raise ConnectionResetError("the client connection ended")
        self.connection.send_headers(stream_id, headers, end_stream=end_stream)
        self.flush()

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.connection.reset_stream(stream_id, error_code)
            self.flush()

    async def _close(self) -> None:
        self.flush_now()  # a GOAWAY queued by the h2 machine goes before the connection ends
        self.closed = True
        self.window_changed()
        tasks = [stream.task for stream in self.streams.values() if stream.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.streams.clear()
        self.on_close()
        with contextlib.suppress(ConnectionError, OSError):
            if not self.writer.is_closing():
                await asyncio.wait_for(self.writer.drain(), 5)
            self.writer.close()


def head_of(headers: Headers) -> Head:
    """A request's HTTP/2 headers as a Head, so that the checks and the header stripping of
    HTTP/1.1 serve it unchanged: the pseudo-headers become the start line and Host, and
    split Cookie headers are joined as HTTP/1.1 carries them (RFC 9113 §8.2.3)."""
    pseudo: dict[str, str] = {}
    fields: list[tuple[str, str]] = []
    cookies: list[str] = []
    for name_bytes, value_bytes in headers:
        name, value = name_bytes.decode("latin-1"), value_bytes.decode("latin-1")
        if name.startswith(":"):
            pseudo[name] = value
        elif name == "cookie":
            cookies.append(value)
        elif name != "host":
            fields.append((name, value))
    authority = pseudo.get(":authority") or next(
        (v.decode("latin-1") for n, v in headers if n == b"host"), ""
    )
    head = Head((pseudo.get(":method", ""), pseudo.get(":path", ""), "HTTP/2"), [("host", authority)])
    head.headers += fields
    if cookies:
        head.headers.append(("cookie", "; ".join(cookies)))
    return head
