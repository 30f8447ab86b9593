"""One HTTP/2 client connection's streams, each checked and relayed to its MicroVM's app.

The checks are the HTTP/1.1 proxy's (proxy.py), per stream. The relay then goes one of two ways:

- to an HTTP/1.1 app: the stream becomes one request on a connection to the app (kept for the
  next stream to the same MicroVM and port), its body chunked unless the client gave a
  Content-Length, and the app's response comes back as the stream's headers and DATA frames;
- to an h2c app (X-aws-proxy-force-h2: true, or gRPC): the stream becomes a stream of one shared
  h2c connection per MicroVM and port (h2_upstream.py); headers, DATA, trailers and RST_STREAM
  pass both ways, under flow control on both sides.

A stream lives at most as long as the token that opened it (as a WebSocket tunnel does): then it
is reset (CANCEL), and the client asks again with a fresh token.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Callable

import h2.errors
import h2.exceptions

from openmicrovm.endpoint.backend import EndpointBackend, Target
from openmicrovm.endpoint.browser_login import login_page, login_token
from openmicrovm.endpoint.h2_server import ClientStream
from openmicrovm.endpoint.h2_upstream import AppEvent, H2Upstream, Headers
from openmicrovm.endpoint.h2c import decoded_body, h2_request_headers
from openmicrovm.endpoint.hostnames import endpoint_hostname
from openmicrovm.endpoint.http1 import (
    BodyTimeout,
    Head,
    ProtocolError,
    drop_conflicting_length,
    parse_head,
    read_head,
    response_framing,
)
from openmicrovm.endpoint.proxy import (
    FORCE_H2_HEADER,
    Counters,
    Refusal,
    admit,
    choose_port,
    database_unavailable,
    open_app_connection,
    request_token,
    running,
    strip_for_app,
)
from openmicrovm.store import StoreUnavailable

# Headers that mean something to one HTTP/1.1 hop only; HTTP/2 has none of them.
_CONNECTION_SPECIFIC = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
# Connections to an HTTP/1.1 app at once per client connection, MicroVM and port (kept open for
# later streams): streams beyond wait their turn, as a browser's requests over HTTP/1.1 do. One
# HTTP/2 connection may carry 100 streams; 100 connections at once to an app with a short listen
# backlog (Python's http.server has 5) would have most of them refused.
MAX_APP_CONNECTIONS = 16
NOT_ENDPOINT = b"HTTP/2 is served for MicroVM endpoints only; the API speaks HTTP/1.1"


# RFC 9110 §5.6.2: a method is a token. A path has no whitespace or control characters: it
# becomes an HTTP/1.1 request line, where a space would split it (h2 refuses CR, LF and NUL).
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATH = re.compile(r"(?:/[\x21-\x7e\x80-\xff]*|\*)")


def check_request(head: Head) -> None:
    """A ProtocolError (400 on the stream) for what HTTP/2's framing lets through but no request
    line can carry: a method that is not a token, a :path that is empty, relative or has spaces
    (CONNECT, which has no :path, among them: no tunnels over HTTP/2 here)."""
    method, path, _ = head.start
    if not _METHOD.fullmatch(method):
        raise ProtocolError(f"invalid :method {method[:40]!r}")
    if not _PATH.fullmatch(path):
        raise ProtocolError(f"invalid :path {path[:80]!r} (it must start with / and have no spaces)")


def wants_h2(head: Head) -> bool:
    """Whether the stream goes to the app as HTTP/2: asked for, or gRPC (HTTP/2 only)."""
    forced = (head.get(FORCE_H2_HEADER) or "").strip().lower() == "true"
    return forced or (head.get("content-type") or "").lower().startswith("application/grpc")


def _lowered(pairs: list[tuple[str, str]], drop: set[str]) -> Headers:
    return [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in pairs
        if name.lower() not in drop
    ]


def response_headers(response: Head) -> Headers:
    """An HTTP/1.1 response head as HTTP/2 headers: :status first, hop-by-hop fields dropped
    (and those its Connection header names)."""
    drop = _CONNECTION_SPECIFIC | response.connection_tokens()
    return [(b":status", response.start[1].encode("latin-1")), *_lowered(response.headers, drop)]


class H2EndpointRelay:
    def __init__(
        self,
        backend: EndpointBackend,
        counters: Counters,
        authenticated: Callable[[], None],
        secure: bool,
    ) -> None:
        self.backend = backend
        self.counters = counters
        self.authenticated = authenticated  # the front door stops counting the connection as unproven
        self.secure = secure
        self._idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self._app_slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._h2: dict[tuple[str, int], list[H2Upstream]] = {}

    async def handle(self, stream: ClientStream) -> None:
        head = stream.head
        target: Target | None = None
        status = 0
        try:
            hostname = endpoint_hostname(head.get("host"))
            if hostname is None:
                raise Refusal(421, "Misdirected Request", NOT_ENDPOINT)
            check_request(head)
            try:
                target = await self.backend.lookup(hostname)
            except StoreUnavailable:
                raise database_unavailable() from None
            port = choose_port(head)
            login = login_token(head)
            if login is not None:
                claims = admit(self.backend, target, login, port)
                self.authenticated()
                lifetime = int(claims.expires_at - self.backend.service.clock())
                status = await self._answer(stream, login_page(login, lifetime, self.secure))
                return
            claims = admit(self.backend, target, request_token(head), port)
            assert target is not None
            self.authenticated()
            await running(self.backend, target)
            async with asyncio.timeout(max(claims.expires_at - self.backend.service.clock(), 0.0)):
                if wants_h2(head):
                    status = await self._to_h2_app(stream, target, port)
                else:
                    status = await self._to_http1_app(stream, target, port)
        except Refusal as refusal:
            status = refusal.status
            if stream.responded:
                stream.reset()
            else:
                await self._answer(stream, refusal.response(close=False))
        except TimeoutError:  # the token that opened the stream expired
            stream.reset(h2.errors.ErrorCodes.CANCEL)
        except ProtocolError as error:
            status = 400
            if stream.responded:
                stream.reset(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            else:
                await self._answer(stream, Refusal(400, "Bad Request", str(error).encode()).response(False))
        except BodyTimeout:
            stream.reset(h2.errors.ErrorCodes.CANCEL)
        finally:
            if target is not None and status:
                self.counters.on_request(target.microvm_id, status)

    async def _answer(self, stream: ClientStream, raw: bytes) -> int:
        """Send a response of ours, written as HTTP/1.1 (a refusal, the login page), on the stream."""
        end = raw.index(b"\r\n\r\n") + 4
        response = parse_head(raw[:end], request=False)
        body = raw[end:]
        headers = response_headers(response)
        stream.send_headers(headers, end_stream=not body)
        if body:
            await stream.send_data(body, end_stream=True)
        return int(response.start[1])

    def _counter(self, microvm_id: str) -> Callable[[int], None]:
        def count(size: int) -> None:
            self.backend.record_activity(microvm_id)
            self.counters.on_bytes(microvm_id, size)

        return count

    # -- to an HTTP/1.1 app ---------------------------------------------------------------------
    async def _to_http1_app(self, stream: ClientStream, target: Target, port: int) -> int:
        slots = self._app_slots.setdefault((target.microvm_id, port), asyncio.Semaphore(MAX_APP_CONNECTIONS))
        async with slots:
            return await self._exchange_http1(stream, target, port)

    async def _exchange_http1(self, stream: ClientStream, target: Target, port: int) -> int:
        vm = target.microvm_id
        head = stream.head
        method, path, _ = head.start
        strip_for_app(head, str(uuid.uuid4()))
        head.remove(lambda name: name in _CONNECTION_SPECIFIC)
        chunked = stream.has_body and not head.get_all("content-length")
        if chunked:
            head.headers.append(("transfer-encoding", "chunked"))
        head.start = (method, path, "HTTP/1.1")
        request = head.serialize()
        count = self._counter(vm)
        key = (vm, port)
        reused = bool(self._idle.get(key))
        reader, writer = (
            self._idle[key].pop() if reused else await open_app_connection(self.backend, vm, port)
        )
        sending: asyncio.Task[bool] | None = None
        kept = False
        try:
            writer.write(request)
            count(len(request))
            if stream.has_body:
                sending = asyncio.ensure_future(self._body_to_http1(stream, writer, chunked, count))
            response, raw = await self._final_response_head(reader)
            if response is None and reused and not stream.has_body:
                # A kept connection the app had closed: once more on a fresh one.
                writer.close()
                reader, writer = await open_app_connection(self.backend, vm, port)
                writer.write(request)
                response, raw = await self._final_response_head(reader)
            if response is None or response.start[1] == "101":
                raise Refusal(502, "Bad Gateway")
            drop_conflicting_length(response)
            count(len(raw))
            framing = response_framing(response, method)
            stream.send_headers(response_headers(response), end_stream=framing.kind == "none")
            if framing.kind != "none":
                async for data in decoded_body(framing, reader):
                    count(len(data))
                    await stream.send_data(data)
                await stream.send_data(b"", end_stream=True)
            body_sent = sending is None or (sending.done() and not sending.cancelled() and sending.result())
            if body_sent and framing.kind != "close" and "close" not in response.connection_tokens():
                idle = self._idle.setdefault(key, [])
                if len(idle) < MAX_APP_CONNECTIONS:
                    idle.append((reader, writer))
                    kept = True
            return int(response.start[1])
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            raise Refusal(502, "Bad Gateway") from None
        finally:
            if sending is not None and not sending.done():
                sending.cancel()
            if not kept:
                writer.close()

    async def _final_response_head(self, reader: asyncio.StreamReader) -> tuple[Head | None, bytes]:
        """The app's final response head (interim 1xx ones are passed over), or None when the app
        closed without answering."""
        while True:
            try:
                raw = await read_head(reader)
            except ProtocolError:
                return None, b""
            if raw is None:
                return None, b""
            response = parse_head(raw, request=False)
            status = int(response.start[1])
            if not (100 <= status < 200) or status == 101:
                return response, raw

    async def _body_to_http1(
        self, stream: ClientStream, writer: asyncio.StreamWriter, chunked: bool, count: Callable[[int], None]
    ) -> bool:
        """The client's body to the app; False if the connection broke first (which the
        response's reading shows too)."""
        with contextlib.suppress(ConnectionError, OSError):
            async for data in stream.body():
                if not data:
                    continue
                framed = b"%x\r\n%s\r\n" % (len(data), data) if chunked else data
                writer.write(framed)
                count(len(framed))
                await writer.drain()
            if chunked:
                trailers = b"".join(b"%s: %s\r\n" % (name, value) for name, value in stream.trailers)
                writer.write(b"0\r\n" + trailers + b"\r\n")
                await writer.drain()
            return True
        return False

    # -- to an h2c app --------------------------------------------------------------------------
    async def _h2_upstream(self, microvm_id: str, port: int) -> H2Upstream:
        """An h2c connection to the app with room for one more stream: the one this client
        connection has, or a new one (the app's SETTINGS may allow fewer streams than ours)."""
        upstreams = self._h2.setdefault((microvm_id, port), [])
        upstreams[:] = [each for each in upstreams if not each.closed]
        for upstream in upstreams:
            if upstream.has_room:
                return upstream
        reader, writer = await open_app_connection(self.backend, microvm_id, port)
        upstream = H2Upstream(reader, writer)
        upstream.start()
        upstreams.append(upstream)
        return upstream

    async def _to_h2_app(self, stream: ClientStream, target: Target, port: int) -> int:
        vm = target.microvm_id
        head = stream.head
        authority = head.get("host") or ""
        strip_for_app(head, str(uuid.uuid4()))
        request = h2_request_headers(head, authority)
        count = self._counter(vm)
        upstream = await self._h2_upstream(vm, port)
        stream_id, events = upstream.open_stream(request, end_stream=not stream.has_body)
        count(sum(len(n) + len(v) for n, v in request))
        sending = (
            asyncio.ensure_future(self._body_to_h2(stream, upstream, stream_id, count))
            if stream.has_body
            else None
        )
        app_done = False  # the app ended or reset its stream, or its connection ended
        try:
            status = await self._from_h2_app(stream, upstream, stream_id, events, count)
            app_done = True
            return status
        finally:
            body_unsent = sending is not None and not sending.done()
            if sending is not None:
                sending.cancel()
            if not app_done or body_unsent:  # the client gave up, or the app answered early
                upstream.reset(stream_id)
            upstream.forget(stream_id)

    async def _from_h2_app(
        self,
        stream: ClientStream,
        upstream: H2Upstream,
        stream_id: int,
        events: asyncio.Queue[AppEvent | None],
        count: Callable[[int], None],
    ) -> int:
        """Pass what the app sends on its stream to the client's, until the app's side ends; the
        response's status."""
        status = 0
        while True:
            event = await events.get()
            if event is None:  # the connection to the app ended
                if not stream.responded:
                    raise Refusal(502, "Bad Gateway")
                stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
                return status
            if event.kind == "headers":
                assert event.headers is not None
                code = dict(event.headers).get(b":status", b"0")
                if code.startswith(b"1"):
                    continue  # interim responses are not passed on
                status = int(code)
                stream.send_headers(event.headers, end_stream=event.end_stream)
                count(sum(len(n) + len(v) for n, v in event.headers))
                if event.end_stream:
                    return status
            elif event.kind == "data":
                count(len(event.data))
                await stream.send_data(event.data)
                upstream.acknowledge(stream_id, event.flow_controlled_length)
            elif event.kind == "trailers":
                assert event.headers is not None
                stream.send_headers(event.headers, end_stream=True)
                return status
            elif event.kind == "end":
                await stream.send_data(b"", end_stream=True)
                return status
            else:  # the app reset the stream: so is the client's
                if not stream.responded:
                    raise Refusal(502, "Bad Gateway")
                stream.reset(event.error_code)
                return status

    async def _body_to_h2(
        self, stream: ClientStream, upstream: H2Upstream, stream_id: int, count: Callable[[int], None]
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError, h2.exceptions.StreamClosedError):
            async for data in stream.body():
                count(len(data))
                await upstream.send_data(stream_id, data)
            if stream.trailers:
                upstream.send_trailers(stream_id, stream.trailers)
            else:
                await upstream.send_data(stream_id, b"", end_stream=True)

    def close(self) -> None:
        """The client connection ended: so do the connections to the apps made for it."""
        for idle in self._idle.values():
            for _reader, writer in idle:
                writer.close()
        self._idle.clear()
        for upstreams in self._h2.values():
            for upstream in upstreams:
                upstream.close()
        self._h2.clear()
