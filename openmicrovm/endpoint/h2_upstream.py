"""One cleartext HTTP/2 (h2c, prior knowledge) connection to an app, shared by many streams.

An HTTP/2 client's streams that go to the app as HTTP/2 (X-aws-proxy-force-h2, or gRPC) share
one such connection per client connection and port, as they share the client's. Each stream has
a queue of what the app sends on it; flow control holds both ways: data from the app is
acknowledged only once it has gone on to the client, and data to the app waits for the app's
window. When the connection ends (the app closed it, the sandbox was suspended), every stream
still open gets None: the client's stream is then answered 502 or reset.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from openmicrovm.endpoint.http1 import RELAY_CHUNK

# Enough to keep a fast app streaming, small enough that a slow client holds little of it here.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 4 * 1024 * 1024
Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class AppEvent:
    """What the app sent on one stream: "headers" (a response head; 1xx ones too), "data",
    "trailers", "end" (END_STREAM), or "reset" (RST_STREAM, with its error code)."""

    kind: str
    headers: Headers | None = None
    end_stream: bool = False  # headers that end the stream (a gRPC "trailers-only" answer)
    data: bytes = b""
    flow_controlled_length: int = 0
    error_code: int = 0


class FlowControlled:
    """Sending DATA on an h2 connection within the peer's windows, waiting when they are shut."""

    def __init__(self, connection: h2.connection.H2Connection, writer: asyncio.StreamWriter) -> None:
        self.connection = connection
        self.writer = writer
        self.closed = False
        self._flush_scheduled = False
        self._window_opened = asyncio.Event()

    def flush(self) -> None:
        """Send what the h2 machine has queued, at the end of this turn of the event loop: the
        frames of every stream answered in one turn (headers, data, window updates) leave in
        one write, which was most of the cost per request when each left on its own."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_scheduled = False
        data = self.connection.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        """Send what is queued now and wait while the peer reads slower than it is sent."""
        self.flush_now()
        await self.writer.drain()

    def acknowledge(self, stream_id: int, length: int) -> None:
        """Data the peer sent has gone on (to the client, to the app): it may send that much more."""
        if self.closed or not length:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.connection.acknowledge_received_data(length, stream_id)
            self.flush()

    def window_changed(self) -> None:
        """A WINDOW_UPDATE or SETTINGS frame came: every sender waiting looks again."""
        self._window_opened.set()
        self._window_opened = asyncio.Event()

    async def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send all of data, in as many frames as the windows and the frame size allow."""
        view = memoryview(data)
        while view:
            if self.closed:
                raise ConnectionResetError("the HTTP/2 connection ended")
            window = min(
                self.connection.local_flow_control_window(stream_id), self.connection.max_outbound_frame_size
            )
            if window <= 0:
                await self._window_opened.wait()
                continue
            piece, view = view[:window], view[window:]
            self.connection.send_data(stream_id, piece.tobytes(), end_stream=end_stream and not view)
            if view or len(piece) >= RELAY_CHUNK:
                await self.drain()  # a large body: backpressure as it goes
            else:
                self.flush()
        if end_stream and not data:
            self.connection.end_stream(stream_id)
            self.flush()


class H2Upstream(FlowControlled):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        super().__init__(h2.connection.H2Connection(config), writer)
        self.reader = reader
        self.streams: dict[int, asyncio.Queue[AppEvent | None]] = {}
        self._receiving: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.connection.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.connection.initiate_connection()
        self.connection.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()
        self._receiving = asyncio.ensure_future(self._receive())

    def open_stream(self, headers: Headers, end_stream: bool) -> tuple[int, asyncio.Queue[AppEvent | None]]:
        """A new stream with these request headers; its id and the queue of what the app sends."""
        stream_id = self.connection.get_next_available_stream_id()
        events: asyncio.Queue[AppEvent | None] = asyncio.Queue()
        self.streams[stream_id] = events
        self.connection.send_headers(stream_id, headers, end_stream=end_stream)
        self.flush()
        return stream_id, events

    @property
    def has_room(self) -> bool:
        """Whether another stream may open now, within the app's concurrent-stream limit."""
        return (
            not self.closed
            and self.connection.open_outbound_streams < self.connection.remote_settings.max_concurrent_streams
        )

    def send_trailers(self, stream_id: int, trailers: Headers) -> None:
        self.connection.send_headers(stream_id, trailers, end_stream=True)
        self.flush()

    def reset(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """The client gave the stream up (or the proxy did): the app is told, once."""
        self.forget(stream_id)
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.connection.reset_stream(stream_id, error_code)
            self.flush()

    def forget(self, stream_id: int) -> None:
        """Nobody reads the stream any more: the window of the data it holds unread goes back
        to the app (unread, it would shrink the connection's window for good)."""
        events = self.streams.pop(stream_id, None)
        while events is not None and not events.empty():
            event = events.get_nowait()
            if event is not None:
                self.acknowledge(stream_id, event.flow_controlled_length)

    async def _receive(self) -> None:
        try:
            while data := await self.reader.read(RELAY_CHUNK):
                try:
                    events = self.connection.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break  # not HTTP/2 (an HTTP/1.1 app answers with a status line), or broken
                for event in events:
                    self._dispatch(event)
                self.flush()
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.window_changed()
            return
        stream_id = getattr(event, "stream_id", None)
        events = self.streams.get(stream_id) if stream_id is not None else None
        if isinstance(event, h2.events.DataReceived):
            if events is None:  # a stream already given up: its window goes back at once
                self.acknowledge(event.stream_id, event.flow_controlled_length)
                return
            events.put_nowait(
                AppEvent("data", data=event.data, flow_controlled_length=event.flow_controlled_length)
            )
        elif events is None:
            return
        elif isinstance(event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            ended = getattr(event, "stream_ended", None) is not None
            events.put_nowait(AppEvent("headers", headers=list(event.headers), end_stream=ended))
        elif isinstance(event, h2.events.TrailersReceived):
            events.put_nowait(AppEvent("trailers", headers=list(event.headers)))
        elif isinstance(event, h2.events.StreamEnded):
            events.put_nowait(AppEvent("end"))  # the reader forgets the stream once it is done
        elif isinstance(event, h2.events.StreamReset):
            events.put_nowait(AppEvent("reset", error_code=int(event.error_code)))

    def close(self) -> None:
        """End the connection; every stream still waiting learns it (None)."""
        if self.closed:
            return
        self.closed = True
        self.window_changed()  # senders waiting for a window give up (their send raises)
        for events in self.streams.values():
            events.put_nowait(None)
        self.streams.clear()
        if self._receiving is not None and self._receiving is not asyncio.current_task():
            self._receiving.cancel()
        self.flush_now()  # resets queued for the app's streams
        self.writer.close()
