"""The shell WebSocket (`wss://<endpoint>/shell`, spec §5.6): an interactive PTY in the MicroVM.

Authentication is a shell token (CreateMicrovmShellAuthToken) in X-aws-proxy-auth or in the
`lambda-microvms.authentication.<token>` subprotocol; the MicroVM must have been run with the
SHELL_INGRESS (or ALL_INGRESS) connector. The session ends when the token expires: the socket is
closed with code 1008 and the reason "token expired". Frames:
- server → client: first a text frame {"type": "session_init", "microvmId", "sessionId"}; then
  binary frames of terminal output; last a text frame {"type": "exit", "status": n} before close.
- client → server: binary (or text) frames are keystrokes; a text frame
  {"type": "resize", "rows": r, "cols": c} resizes the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

from aiohttp import WSMsgType, web

from openmicrovm.endpoint.backend import EndpointBackend, Unreachable
from openmicrovm.endpoint.hostnames import endpoint_hostname
from openmicrovm.endpoint.http1 import Head
from openmicrovm.endpoint.proxy import NO_SHELL_INGRESS, Refusal, authorize, database_unavailable
from openmicrovm.endpoint.websocket import POLICY_VIOLATION, TOKEN_EXPIRED
from openmicrovm.service.tokens import SHELL_PORT
from openmicrovm.store import StoreUnavailable


def _size(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name, "")
    return min(max(int(value), 1), 1000) if value.isascii() and value.isdigit() else default


async def shell_handler(backend: EndpointBackend, request: web.Request) -> web.StreamResponse:
    hostname = endpoint_hostname(request.host)
    head = Head(("GET", request.path_qs, "HTTP/1.1"), list(request.headers.items()))
    try:
        try:
            target = await backend.lookup(hostname) if hostname else None
        except StoreUnavailable:
            raise database_unavailable() from None
        claims = authorize(backend, target, head, "shell", SHELL_PORT)
        assert target is not None
        if not target.shell_ingress:
            raise Refusal(403, "Forbidden", NO_SHELL_INGRESS)
        try:
            await backend.ready(target)
        except Unreachable:
            raise Refusal(502, "Bad Gateway") from None
        except StoreUnavailable:
            raise database_unavailable() from None
        session = await backend.open_shell(
            target.microvm_id, _size(request, "rows", 24), _size(request, "cols", 80)
        )
    except Refusal as refusal:
        return web.Response(
            status=refusal.status, body=refusal.body, content_type="text/plain" if refusal.body else None
        )
    except Unreachable:
        return web.Response(status=502)

    socket = web.WebSocketResponse(protocols=("lambda-microvms",), heartbeat=30)
    await socket.prepare(request)
    await socket.send_str(
        json.dumps({"type": "session_init", "microvmId": target.microvm_id, "sessionId": str(uuid.uuid4())})
    )

    async def output() -> None:
        while data := await session.read():
            backend.record_activity(target.microvm_id)
            await socket.send_bytes(data)
        status = await session.wait()
        await socket.send_str(json.dumps({"type": "exit", "status": status}))
        await socket.close()  # ends the input loop below

    async def expire() -> None:
        # A terminal outlives no token: the session ends when the token that opened it expires.
        await asyncio.sleep(max(claims.expires_at - backend.service.clock(), 0.0))
        await socket.close(code=POLICY_VIOLATION, message=TOKEN_EXPIRED.encode())

    pumping = asyncio.ensure_future(output())
    expiring = asyncio.ensure_future(expire())
    try:
        async for message in socket:
            if message.type == WSMsgType.BINARY:
                await session.write(message.data)
            elif message.type == WSMsgType.TEXT:
                control = _control(message.data)
                if control is None:
                    await session.write(message.data.encode())
                elif control.get("type") == "resize":
                    await session.resize(int(control.get("rows", 24)), int(control.get("cols", 80)))
            backend.record_activity(target.microvm_id)
    finally:
        for task in (pumping, expiring):
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        await session.close()
        await socket.close()
    return socket


def _control(text: str) -> dict[str, object] | None:
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "type" in value else None
