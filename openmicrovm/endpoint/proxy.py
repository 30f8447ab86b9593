"""The data plane: one MicroVM endpoint connection, proxied to the app inside the sandbox
(spec §5.3, appendix B).

Per request: check the token (header or WebSocket subprotocol), choose the port (X-aws-proxy-port,
then the lambda-microvms.port.N subprotocol, then 8080), check that the MicroVM's ingress
connectors let HTTP in (HTTP_INGRESS or ALL_INGRESS), make sure the MicroVM is running
(holding the request through PENDING or an auto-resume), strip every X-aws-proxy-* header and our
subprotocols, and relay the request and the response as bytes, unbuffered. An upgrade (WebSocket,
h2c) becomes a raw tunnel, which ends when the token that opened it expires. Every relayed byte
counts as activity for the idle timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from openmicrovm.endpoint.backend import EndpointBackend, Target, Unreachable
from openmicrovm.endpoint.browser_login import cookie_token, login_page, login_token, strip_cookie
from openmicrovm.endpoint.h2c import ForcedH2, UpstreamNotH2, decoded_body
from openmicrovm.endpoint.http1 import (
    BodyProgress,
    BodyTimeout,
    Framing,
    Head,
    HeldHead,
    ProtocolError,
    drop_conflicting_length,
    parse_head,
    pipe,
    read_head,
    relay_body,
    request_framing,
    response_framing,
    simple_response,
)
from openmicrovm.endpoint.websocket import POLICY_VIOLATION, TOKEN_EXPIRED, FrameBoundaries, close_frame
from openmicrovm.runtime.driver import PortNotListening, TooManyConnections
from openmicrovm.service.token_seal import TokenClaims, TokenError
from openmicrovm.store import StoreUnavailable

log = logging.getLogger("openmicrovm.endpoint")

DEFAULT_PORT = 8080
HEAD_TIMEOUT = 30.0  # a client gets this long to send a request head (slowloris)
AUTH_HEADER = "x-aws-proxy-auth"
FORCE_H2_HEADER = "x-aws-proxy-force-h2"
PORT_HEADER = "x-aws-proxy-port"
SUBPROTOCOL_PREFIX = "lambda-microvms"
MISSING_AUTH = b"Request missing authentication"
AUTH_FAILED = b"Token authentication failed"
# AWS records no text for these; a 403 that says which connector is missing.
NO_HTTP_INGRESS = b"This MicroVM was run without HTTP_INGRESS or ALL_INGRESS: its endpoint takes no requests"
NO_SHELL_INGRESS = b"This MicroVM was run without SHELL_INGRESS or ALL_INGRESS: it has no shell"

_T = TypeVar("_T")


class Refusal(Exception):
    """Answer the client with this response instead of proxying."""

    def __init__(self, status: int, reason: str, body: bytes = b"", close: bool = False) -> None:
        super().__init__(f"{status} {reason}")
        self.status, self.reason, self.body, self.close = status, reason, body, close

    def response(self, close: bool) -> bytes:
        return simple_response(self.status, self.reason, self.body, close)


@dataclass
class Counters:
    """Observers of endpoint traffic: (microvm_id, bytes) per relayed piece, and per request."""

    on_bytes: Callable[[str, int], None] = lambda _vm, _n: None
    on_request: Callable[[str, int], None] = lambda _vm, _status: None


def _subprotocols(head: Head) -> list[str]:
    return [p.strip() for v in head.get_all("sec-websocket-protocol") for p in v.split(",") if p.strip()]


def request_token(head: Head) -> str | None:
    values = head.get_all(AUTH_HEADER)
    if len(values) > 1:
        raise Refusal(400, "Bad Request", b"more than one X-aws-proxy-auth header")
    if values:
        return values[0]
    for protocol in _subprotocols(head):
        if protocol.startswith(f"{SUBPROTOCOL_PREFIX}.authentication."):
            return protocol[len(f"{SUBPROTOCOL_PREFIX}.authentication.") :]
    # A browser tab opened from the console (browser_login.py).
    return cookie_token(head)


def choose_port(head: Head) -> int:
    values = head.get_all(PORT_HEADER)
    text = None
    if len(values) > 1:
        raise Refusal(400, "Bad Request", b"more than one X-aws-proxy-port header")
    if values:
        text = values[0].strip()
    else:
        for protocol in _subprotocols(head):
            if protocol.startswith(f"{SUBPROTOCOL_PREFIX}.port."):
                text = protocol[len(f"{SUBPROTOCOL_PREFIX}.port.") :]
                break
    if text is None:
        return DEFAULT_PORT
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise Refusal(400, "Bad Request", b"invalid port")
    return int(text)


def database_unavailable() -> Refusal:
    """The answer while the server's database is away: 503, which clients may retry."""
    return Refusal(
        503, "Service Unavailable", b"The service's database is unavailable; try again shortly.", close=True
    )


def authorize(
    backend: EndpointBackend, target: Target | None, head: Head, kind: str, port: int
) -> TokenClaims:
    return check_token(backend, target, request_token(head), kind, port)


def check_token(
    backend: EndpointBackend, target: Target | None, token: str | None, kind: str, port: int
) -> TokenClaims:
    if not token:
        raise Refusal(403, "Forbidden", MISSING_AUTH)
    try:
        claims = backend.service.keyring.open(token.strip())
    except TokenError:
        raise Refusal(403, "Forbidden", MISSING_AUTH) from None
    if target is None or claims.microvm_id != target.microvm_id or claims.account != target.account:
        raise Refusal(403, "Forbidden", AUTH_FAILED)
    if claims.kind != kind:
        raise Refusal(403, "Forbidden", AUTH_FAILED)
    if claims.expires_at <= backend.service.clock():
        raise Refusal(403, "Forbidden", b"Token expired")
    if not claims.allows_port(port):
        raise Refusal(403, "Forbidden", f"Port {port} is not allowed by this token".encode())
    return claims


def admit(backend: EndpointBackend, target: Target | None, token: str | None, port: int) -> TokenClaims:
    """The checks every endpoint request passes before it may reach the app: its token, then the
    MicroVM's HTTP ingress (an allow-list: NO_INGRESS, SHELL_INGRESS alone, or no connector at
    all lets no HTTP in)."""
    claims = check_token(backend, target, token, "endpoint", port)
    assert target is not None
    if not target.http_ingress:
        raise Refusal(403, "Forbidden", NO_HTTP_INGRESS)
    return claims


def strip_for_app(head: Head, request_id: str) -> None:
    """Remove everything of ours before the app sees the request (spec §5.3)."""
    head.remove(lambda name: name.startswith("x-aws-proxy-"))
    strip_cookie(head)
    protocols = [
        p
        for p in _subprotocols(head)
        if p != SUBPROTOCOL_PREFIX and not p.startswith(f"{SUBPROTOCOL_PREFIX}.")
    ]
    head.remove(lambda name: name == "sec-websocket-protocol" or name == "x-amzn-requestid")
    if protocols:
        head.headers.append(("Sec-WebSocket-Protocol", ", ".join(protocols)))
    head.headers.append(("x-amzn-RequestId", request_id))


async def running(backend: EndpointBackend, target: Target, close: bool = False) -> None:
    """Return once the MicroVM runs (held through PENDING, resumed if its idle policy lets a
    request resume it), or raise the Refusal the client gets instead."""
    try:
        await backend.ready(target)
    except Unreachable:
        raise Refusal(502, "Bad Gateway", close=close) from None
    except StoreUnavailable:
        raise database_unavailable() from None


async def open_app_connection(
    backend: EndpointBackend, microvm_id: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection to the app, or the Refusal the client gets instead."""
    try:
        return await backend.connect(microvm_id, port)
    except TooManyConnections:
        # The MicroVM takes no more connections at once: the client may try again (spec §5.3).
        raise Refusal(429, "Too Many Requests", b"Too many concurrent connections to this MicroVM") from None
    except (PortNotListening, Unreachable):
        raise Refusal(502, "Bad Gateway") from None


class EndpointConnection:
    """Serves the requests of one client connection to one MicroVM endpoint."""

    def __init__(
        self,
        backend: EndpointBackend,
        hostname: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        counters: Counters,
        authenticated: Callable[[], None] = lambda: None,
    ) -> None:
        self.backend = backend
        self.hostname = hostname
        self.reader = reader
        self.writer = writer
        self.counters = counters
        # Called when a request on this connection first passes its token check (the front door
        # caps connections that have not).
        self.authenticated = authenticated
        # An idle upstream connection kept for the next request: (port, reader, writer).
        self._upstream: tuple[int, asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def serve(self, first_head: bytes) -> None:
        data: bytes | None = first_head
        try:
            while data is not None:
                keep_alive = await self._one(data)
                if not keep_alive:
                    break
                try:
                    # asyncio.timeout, not wait_for: no task per request on a kept-alive connection.
                    async with asyncio.timeout(HEAD_TIMEOUT):
                        data = await read_head(self.reader)
                except (TimeoutError, ProtocolError):
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            self._drop_upstream()
            with contextlib.suppress(ConnectionError, OSError):
                self.writer.close()

    def _drop_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream[2].close()
            self._upstream = None

    async def _upstream_for(
        self, microvm_id: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A connection to the app: the one kept from the last request when it is still open
        (third item True), else a new one."""
        if self._upstream is not None:
            kept_port, reader, writer = self._upstream
            self._upstream = None
            if kept_port == port and not reader.at_eof() and not writer.is_closing():
                return reader, writer, True
            writer.close()
        reader, writer = await self._open_upstream(microvm_id, port)
        return reader, writer, False

    async def _open_upstream(
        self, microvm_id: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await open_app_connection(self.backend, microvm_id, port)

    def _counter(self, microvm_id: str) -> Callable[[bytes], None]:
        """Counts the bytes relayed for a MicroVM; each piece is also activity for its idle timer."""

        def count(piece: bytes) -> None:
            self.backend.record_activity(microvm_id)
            self.counters.on_bytes(microvm_id, len(piece))

        return count

    async def _one(self, data: bytes) -> bool:
        """Proxy one request; True when the client connection can carry another."""
        try:
            head = parse_head(data, request=True)
        except ProtocolError as error:
            self.writer.write(simple_response(400, "Bad Request", str(error).encode(), close=True))
            return False
        target = None
        try:
            try:
                target = await self.backend.lookup(self.hostname)
            except StoreUnavailable:
                raise database_unavailable() from None
            hosts = head.get_all("host")
            if len(hosts) != 1:
                raise Refusal(400, "Bad Request", b"exactly one Host header is required", close=True)
            framing = request_framing(head)
            port = choose_port(head)
            login = login_token(head)
            if login is not None:
                keep_alive = _client_keeps_alive(head) and not _has_body(head)
                return await self._browser_login(target, login, port, keep_alive)
            claims = admit(self.backend, target, request_token(head), port)
            assert target is not None
            self.authenticated()
            await running(self.backend, target, close=True)
            if (head.get(FORCE_H2_HEADER) or "").strip().lower() == "true":
                return await self._proxy_h2(target, head, framing, port)
            return await self._proxy(target, head, framing, port, claims.expires_at)
        except ProtocolError as error:
            self.writer.write(simple_response(400, "Bad Request", str(error).encode(), close=True))
            return False
        except BodyTimeout as error:
            self.writer.write(simple_response(408, "Request Timeout", str(error).encode(), close=True))
            return False
        except Refusal as refusal:
            # A refused request's body is not read: the connection ends instead.
            close = refusal.close or _has_body(head) or not _client_keeps_alive(head)
            self.writer.write(refusal.response(close))
            await self.writer.drain()
            if target is not None:
                self.counters.on_request(target.microvm_id, refusal.status)
            return not close

    async def _browser_login(self, target: Target | None, token: str, port: int, keep_alive: bool) -> bool:
        """Answer GET /.openmicrovm/login?token=...: the token checked, then set as a cookie."""
        claims = admit(self.backend, target, token, port)
        assert target is not None
        self.authenticated()
        lifetime = int(claims.expires_at - self.backend.service.clock())
        secure = self.writer.get_extra_info("ssl_object") is not None
        self.writer.write(login_page(token, lifetime, secure))
        await self.writer.drain()
        self.counters.on_request(target.microvm_id, 200)
        return keep_alive

    async def _proxy(
        self, target: Target, head: Head, framing: Framing, port: int, expires_at: float
    ) -> bool:
        vm = target.microvm_id
        request_id = str(uuid.uuid4())
        method = head.start[0]
        client_keep_alive = _client_keeps_alive(head)
        upgrade = "upgrade" in head.connection_tokens()
        strip_for_app(head, request_id)
        count = self._counter(vm)
        serialized = head.serialize()
        for attempt in (1, 2):
            up_reader, up_writer, reused = await self._upstream_for(vm, port)
            up_writer.write(serialized)
            count(serialized)
            # Most requests have no body: no task then, the request is all sent already.
            sending: asyncio.Future[None] | None = None
            if framing.kind != "none":
                sending = asyncio.ensure_future(
                    relay_body(framing, self.reader, up_writer, count, BodyProgress())
                )
            try:
                raw, response, status = await _unless_body_fails(
                    self._response_head(up_reader, count), sending
                )
            except (ConnectionError, OSError):
                # The app's side broke before it answered (reset, the sandbox died): a 502, never silence.
                _cancel(sending)
                up_writer.close()
                raise Refusal(502, "Bad Gateway", close=True) from None
            except BaseException:
                _cancel(sending)
                up_writer.close()
                raise
            if raw is not None:
                break
            _cancel(sending)
            up_writer.close()
            # A kept connection the app had closed: one fresh try when nothing of the body went.
            if not (reused and attempt == 1 and framing.kind == "none"):
                raise Refusal(502, "Bad Gateway", close=True)
        assert raw is not None and response is not None
        # Both framings from the app: its Transfer-Encoding frames the body and its
        # Content-Length is dropped (RFC 9112 §6.3) rather than the response refused, since the
        # message is well defined; but what the app sends after it on this connection is not,
        # so the connection to the app is not kept.
        conflicting = drop_conflicting_length(response)
        if conflicting:
            raw = response.serialize()
        self.counters.on_request(vm, status)
        count(raw)
        if status == 101 and upgrade:
            self.writer.write(raw)
            websocket = (response.get("upgrade") or "").strip().lower() == "websocket"
            await self._tunnel(up_reader, up_writer, count, sending, expires_at, websocket)
            return False
        body = response_framing(response, method)
        to_client = HeldHead(self.writer, raw)
        try:
            await _unless_body_fails(relay_body(body, up_reader, to_client, count), sending)
            to_client.flush()
            if sending is not None:
                await asyncio.wait_for(sending, HEAD_TIMEOUT)
        except (TimeoutError, ProtocolError, BodyTimeout):
            # The response has begun: no status can be sent any more, the connection ends.
            to_client.flush()
            _cancel(sending)
            up_writer.close()
            return False
        upstream_reusable = (
            body.kind != "close" and "close" not in response.connection_tokens() and not conflicting
        )
        if upstream_reusable:
            self._upstream = (port, up_reader, up_writer)
        else:
            up_writer.close()
        return client_keep_alive and body.kind != "close"

    async def _proxy_h2(self, target: Target, head: Head, framing: Framing, port: int) -> bool:
        """X-aws-proxy-force-h2: the app speaks h2c; the client keeps speaking HTTP/1.1."""
        vm = target.microvm_id
        authority = head.get("host") or self.hostname
        strip_for_app(head, str(uuid.uuid4()))
        count = self._counter(vm)
        up_reader, up_writer = await self._open_upstream(vm, port)
        body = decoded_body(framing, self.reader, BodyProgress()) if framing.kind != "none" else None
        exchange = ForcedH2(up_reader, up_writer)
        try:
            status = await exchange.run(head, authority, body, self.writer, count)
        except UpstreamNotH2:
            raise Refusal(502, "Bad Gateway", close=True) from None
        except (ProtocolError, BodyTimeout):
            if exchange.responded:  # too late for a status: the connection ends
                return False
            raise
        self.counters.on_request(vm, status)
        return _client_keeps_alive(head)

    async def _response_head(
        self, up_reader: asyncio.StreamReader, count: Callable[[bytes], None]
    ) -> tuple[bytes | None, Head | None, int]:
        """The app's final response head, passing interim 1xx responses (100 Continue) on;
        (None, None, 0) when the app closed without answering."""
        while True:
            try:
                raw = await read_head(up_reader)
            except ProtocolError:
                raw = None
            if raw is None:
                return None, None, 0
            response = parse_head(raw, request=False)
            status = int(response.start[1])
            if 100 <= status < 200 and status != 101:
                if drop_conflicting_length(response):  # never both to a client, even here
                    raw = response.serialize()
                self.writer.write(raw)
                count(raw)
                continue
            return raw, response, status

    async def _tunnel(
        self,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        count: Callable[[bytes], None],
        sending: asyncio.Future[None] | None,
        expires_at: float,
        websocket: bool,
    ) -> None:
        """Relay both ways until either side ends, or until the token that opened the tunnel
        expires: a tunnel is not re-checked like a request, so its token's lifetime bounds it
        (issue 11; AWS lets such streams run on). A WebSocket client then gets a close frame
        (1008, "token expired") when the app is between frames, so it knows to get a new token."""
        _cancel(sending)
        boundaries = FrameBoundaries()

        def to_client(piece: bytes) -> None:
            boundaries.feed(piece)
            count(piece)

        # Bytes the client sent after its upgrade request may already be buffered in our reader.
        relaying = asyncio.gather(
            pipe(self.reader, up_writer, count), pipe(up_reader, self.writer, to_client)
        )
        try:
            async with asyncio.timeout(max(expires_at - self.backend.service.clock(), 0.0)):
                await relaying
        except TimeoutError:
            if websocket and boundaries.at_boundary and not self.writer.is_closing():
                self.writer.write(close_frame(POLICY_VIOLATION, TOKEN_EXPIRED))
                with contextlib.suppress(ConnectionError, OSError):
                    await asyncio.wait_for(self.writer.drain(), 5)
        finally:
            up_writer.close()


def _cancel(sending: asyncio.Future[None] | None) -> None:
    if sending is not None:
        sending.cancel()


async def _unless_body_fails(awaitable: Awaitable[_T], sending: asyncio.Future[None] | None) -> _T:
    """The awaitable's result, unless the client's request body proves malformed or too slow
    first (its ProtocolError or BodyTimeout is raised then): an app still waiting for the rest
    of that body would never answer, and the client would wait as long. Without a body being
    sent (None) it is awaited as it is."""
    if sending is None:
        return await awaitable
    task = asyncio.ensure_future(awaitable)
    try:
        while not task.done():
            waited: set[asyncio.Future[Any]] = {task} if sending.done() else {task, sending}
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            if sending.done() and not sending.cancelled():
                error = sending.exception()
                if isinstance(error, ProtocolError | BodyTimeout):
                    raise error
        return task.result()
    finally:
        task.cancel()


def _client_keeps_alive(head: Head) -> bool:
    tokens = head.connection_tokens()
    if head.start[2] == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _has_body(head: Head) -> bool:
    try:
        framing = request_framing(head)
    except ProtocolError:
        return True
    return framing.kind != "none" and not (framing.kind == "length" and framing.length == 0)
