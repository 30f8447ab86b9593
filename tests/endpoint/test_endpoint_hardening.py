"""The endpoint data plane under attack (issue 11), each against the real server process:
ingress connectors as an allow-list, bare LFs and chunks without their CRLF, an app that frames a
response twice, request bodies that stall or trickle, a flood of sockets that never authenticate,
and WebSocket / shell sessions that outlive their token."""

from __future__ import annotations

import asyncio
import base64
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from openmicrovm.endpoint.front_door import MAX_UNAUTHENTICATED
from openmicrovm.endpoint.http1 import BODY_TIMEOUT
from openmicrovm.endpoint.proxy import HEAD_TIMEOUT, NO_HTTP_INGRESS
from tests.endpoint.conftest import HTTP, SHELL, run_microvm
from tests.reliability.rawhttp import exchange
from tests.support.endpoint import auth_token, call
from tests.support.http import read_one_response
from tests.support.server import ServerProcess

ALL = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:ALL_INGRESS"
# What closing a connection may take beyond its timeout on a busy, shared machine.
GRACE = 20.0


def _shell_token(server: ServerProcess, vm: dict[str, Any], minutes: int = 5) -> str:
    return server.client().create_microvm_shell_auth_token(
        microvmIdentifier=vm["microvmId"], expirationInMinutes=minutes
    )["authToken"]["X-aws-proxy-auth"]


def _shell_protocols(token: str) -> tuple[str, ...]:
    return ("lambda-microvms", f"lambda-microvms.authentication.{token}", "lambda-microvms.port.8022")


async def _shell_output(server: ServerProcess, vm: dict[str, Any], token: str, command: bytes) -> str:
    """Run command in the MicroVM's shell; what the terminal showed."""
    output = b""
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            f"{server.url}/shell", headers={"Host": vm["endpoint"]}, protocols=_shell_protocols(token)
        ) as ws,
    ):
        assert json.loads((await ws.receive()).data)["type"] == "session_init"
        await ws.send_bytes(command + b"; exit\n")
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                output += message.data
    return output.decode(errors="replace")


async def _shell_refused(server: ServerProcess, vm: dict[str, Any], token: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(
                f"{server.url}/shell", headers={"Host": vm["endpoint"]}, protocols=_shell_protocols(token)
            )
    return refused.value.status, refused.value.message


# ------------------------------------------------------------------------------ ingress


def test_ingress_connectors_are_an_allow_list(endpoint_server: ServerProcess, echo_image: str) -> None:
    client = endpoint_server.client()
    for connectors, http_open, shell_open in (
        ([SHELL], False, True),
        ([HTTP], True, False),
        ([ALL], True, True),
    ):
        vm = run_microvm(endpoint_server, echo_image, ingressNetworkConnectors=connectors)
        try:
            token = auth_token(client, vm["microvmId"])  # endpoint tokens are minted for any of these
            response = call(endpoint_server, vm["endpoint"], token, "/headers")
            websocket = call(
                endpoint_server,
                vm["endpoint"],
                token,
                "/ws",
                headers={
                    "Connection": "Upgrade",
                    "Upgrade": "websocket",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
                },
            )
            if http_open:
                assert response.status == 200, (connectors, response)
                assert websocket.status == 101, (connectors, websocket.status)
            else:
                assert (response.status, response.body) == (403, NO_HTTP_INGRESS), connectors
                assert (websocket.status, websocket.body) == (403, NO_HTTP_INGRESS), connectors
            if shell_open:
                shell = _shell_token(endpoint_server, vm)
                output = asyncio.run(
                    asyncio.wait_for(_shell_output(endpoint_server, vm, shell, b"echo $((6*7))"), 60)
                )
                assert "42" in output.replace("$((6*7))", ""), (connectors, output)
            else:
                with pytest.raises(client.exceptions.ValidationException, match="SHELL_INGRESS"):
                    _shell_token(endpoint_server, vm)
                # Nor does an endpoint token open the shell.
                status, _ = asyncio.run(_shell_refused(endpoint_server, vm, token))
                assert status == 403, connectors
        finally:
            client.terminate_microvm(microvmIdentifier=vm["microvmId"])


# ------------------------------------------------------------------------------ HTTP/1.1 framing


def _head(vm: dict[str, Any], token: str, start: str = "GET /headers HTTP/1.1", extra: str = "") -> str:
    return f"{start}\r\nHost: {vm['endpoint']}\r\nX-aws-proxy-auth: {token}\r\n{extra}"


def test_bare_line_feeds_and_chunks_without_crlf_are_refused(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"], [{"allPorts": {}}])
    refused = {
        "bare LF inside the request line": _head(echo_vm, token, "GET /headers\n HTTP/1.1") + "\r\n",
        "request line ended by a bare LF": "GET /headers HTTP/1.1\n"
        + _head(echo_vm, token).split("\r\n", 1)[1]
        + "\r\n",
        "bare CR inside the request line": _head(echo_vm, token, "GET /headers\rX HTTP/1.1") + "\r\n",
        "bare LF in a header line": _head(echo_vm, token, extra="X-A: b\nX-aws-proxy-port: 9090\r\n")
        + "\r\n",
        "chunk data followed by other bytes": _head(
            echo_vm, token, "POST /upload HTTP/1.1", "Transfer-Encoding: chunked\r\n"
        )
        + "\r\n5\r\nhelloXX0\r\n\r\n",
        "chunk data followed by a bare LF": _head(
            echo_vm, token, "POST /upload HTTP/1.1", "Transfer-Encoding: chunked\r\n"
        )
        + "\r\n5\r\nhello\n0\r\n\r\n",
        "a trailer with a bare LF": _head(
            echo_vm, token, "POST /upload HTTP/1.1", "Transfer-Encoding: chunked\r\n"
        )
        + "\r\n5\r\nhello\r\n0\r\nX-T: a\nX-U: b\r\n\r\n",
    }
    for what, raw in refused.items():
        answer = exchange(endpoint_server.port, raw.encode(), timeout=30)
        assert answer.status == 400, (what, answer)
        assert answer.closed, (what, answer)
    # The same requests, well formed, are served.
    well_formed = (
        _head(echo_vm, token, "POST /upload HTTP/1.1", "Transfer-Encoding: chunked\r\nConnection: close\r\n")
        + "\r\n5\r\nhello\r\n0\r\nX-T: a\r\n\r\n"
    )
    answer = exchange(endpoint_server.port, well_formed.encode(), timeout=30)
    assert answer.status == 200 and json.loads(answer.body)["bytes"] == 5, answer


# An app (started in the MicroVM through the shell) that frames each response both ways, and
# puts a second, smuggled response after it for a proxy that believes the Content-Length or
# reuses the connection.
DOUBLE_FRAMING_PORT = 7071
DOUBLE_FRAMING_APP = f"""
import socket, threading
RESPONSE = (b"HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n"
            b"5\\r\\nhello\\r\\n0\\r\\n\\r\\n"
            b"HTTP/1.1 200 OK\\r\\nContent-Length: 8\\r\\n\\r\\nsmuggled")
def serve(conn):
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    conn.sendall(RESPONSE)
    conn.recv(65536)
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", {DOUBLE_FRAMING_PORT}))
listener.listen(16)
print("READY" + "-FRAMING", flush=True)
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One chunked response: its head, and its body decoded."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    while not rest.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        assert chunk, (head, rest)
        rest += chunk
    body = b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return head, body
        body, rest = body + rest[:size], rest[size + 2 :]


def test_a_client_never_gets_both_content_length_and_transfer_encoding(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    server, vm = endpoint_server, echo_vm
    token = auth_token(server.client(), vm["microvmId"], [{"allPorts": {}}])
    shell = _shell_token(server, vm)
    encoded = base64.b64encode(DOUBLE_FRAMING_APP.encode()).decode()

    def two_requests() -> list[tuple[bytes, bytes]]:
        request = _head(vm, token, extra=f"X-aws-proxy-port: {DOUBLE_FRAMING_PORT}\r\n") + "\r\n"
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            answers = []
            for _ in range(2):  # the second on the same client connection
                sock.sendall(request.encode())
                answers.append(_read_response(sock))
            return answers

    async def session() -> list[tuple[bytes, bytes]]:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"{server.url}/shell", headers={"Host": vm["endpoint"]}, protocols=_shell_protocols(shell)
            ) as ws,
        ):
            await ws.receive()  # session_init
            await ws.send_bytes(f'python3 -c "$(echo {encoded} | base64 -d)" &\n'.encode())
            seen = b""
            while b"READY-FRAMING" not in seen:
                message = await ws.receive()
                assert message.type == aiohttp.WSMsgType.BINARY, (message, seen)
                seen += message.data
            answers = await asyncio.to_thread(two_requests)
            await ws.send_bytes(b"kill %1; exit\n")
            return answers

    for head, body in asyncio.run(asyncio.wait_for(session(), 90)):
        lines = [line.lower() for line in head.split(b"\r\n")]
        assert lines[0].startswith(b"http/1.1 200"), head
        assert b"transfer-encoding: chunked" in lines, head
        assert not [line for line in lines if line.startswith(b"content-length")], head
        assert body == b"hello"  # framed by its Transfer-Encoding; the smuggled response never came


# ------------------------------------------------------------------------------ slow bodies


@dataclass
class _SlowBody:
    """Sends a request head (and a body's first bytes) at once, then one body byte a second, and
    records whether and what the server answered and when it closed the connection."""

    port: int
    first: bytes
    trickle: bytes  # b"": send nothing more
    closed: threading.Event
    answer: bytes = b""

    def run(self, stop: threading.Event) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(self.first)
            position = 0
            while not stop.is_set():
                readable, _, _ = select.select([sock], [], [], 1.0)
                if readable:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        self.closed.set()
                        return
                    self.answer += data
                elif position < len(self.trickle):
                    try:
                        sock.sendall(self.trickle[position : position + 1])
                    except OSError:
                        self.closed.set()
                        return
                    position += 1


def test_request_bodies_that_stall_or_trickle_are_cut(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    server, vm = endpoint_server, echo_vm
    token = auth_token(server.client(), vm["microvmId"])
    upload = _head(vm, token, "POST /upload HTTP/1.1")
    api = (
        "POST /2025-09-09/microvm-images HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
    )
    clients = {
        "endpoint body that stops": (upload + "Content-Length: 100000\r\n\r\n" + "a" * 100, b""),
        "endpoint body that trickles": (upload + "Content-Length: 100000\r\n\r\n", b"a" * 10_000),
        "endpoint chunked body that trickles": (
            upload + "Transfer-Encoding: chunked\r\n\r\n",
            b"1\r\na\r\n" * 10_000,
        ),
        "API body that stops": (api, b""),
        "API body that trickles": (api, b" " * 10_000),
    }
    stop = threading.Event()
    slow = {
        name: _SlowBody(server.port, first.encode(), then, threading.Event())
        for name, (first, then) in clients.items()
    }
    threads = [threading.Thread(target=client.run, args=(stop,), daemon=True) for client in slow.values()]
    for thread in threads:
        thread.start()
    try:
        # While they wait, everyone else is served.
        assert call(server, vm["endpoint"], token, "/headers").status == 200
        assert server.client().list_managed_microvm_images()["items"]
        deadline = time.monotonic() + BODY_TIMEOUT + GRACE
        while time.monotonic() < deadline and not all(c.closed.is_set() for c in slow.values()):
            time.sleep(0.5)
        open_still = [name for name, c in slow.items() if not c.closed.is_set()]
        assert open_still == [], open_still
        for name, client in slow.items():
            if name.startswith("endpoint"):  # the proxy says why before closing
                assert client.answer.startswith(b"HTTP/1.1 408 "), (name, client.answer[:200])
            else:  # the API was still waiting for the body: the cut, not an answer, ended it
                assert client.answer == b"", (name, client.answer[:200])
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
    # The MicroVM's app was not harmed by the cut uploads (a new token: "minutes" are short here).
    fresh = auth_token(server.client(), vm["microvmId"])
    assert call(server, vm["endpoint"], fresh, "/headers").status == 200


# ------------------------------------------------------------------------------ connection flood


def _closed_by_server(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except OSError:
        return True


@contextmanager
def _idle_sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def test_a_flood_of_unauthenticated_connections_is_capped(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    server, vm = endpoint_server, echo_vm
    token = auth_token(server.client(), vm["microvmId"])
    request = (_head(vm, token) + "\r\n").encode()
    excess = 40
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as kept:
        kept.sendall(request)  # an authenticated connection from before the flood
        assert read_one_response(kept).startswith(b"HTTP/1.1 200")
        with _idle_sockets(server.port, MAX_UNAUTHENTICATED + excess) as flood:
            # Well before the head timeout would close them all anyway.
            deadline = time.monotonic() + HEAD_TIMEOUT / 2
            while time.monotonic() < deadline and sum(map(_closed_by_server, flood)) < excess:
                time.sleep(0.2)
            closed = [sock for sock in flood if _closed_by_server(sock)]
            assert len(closed) >= excess, len(closed)
            # The oldest went first: the newest sockets are the ones still open.
            assert not _closed_by_server(flood[-1])
            # New clients, the API and the authenticated connection are all still served.
            assert server.client().list_managed_microvm_images()["items"]
            assert call(server, vm["endpoint"], token, "/headers").status == 200
            kept.sendall(request)
            assert read_one_response(kept).startswith(b"HTTP/1.1 200")
            # A connection whose token failed stays unauthenticated (kept alive after its 403)
            # and counts against the cap like an idle one.
            with _idle_sockets(server.port, excess) as refused:
                for sock in refused:
                    sock.sendall((_head(vm, "forged") + "\r\n").encode())
                    assert read_one_response(sock).startswith(b"HTTP/1.1 403")
                still_open = [sock for sock in flood + refused if not _closed_by_server(sock)]
                assert len(still_open) <= MAX_UNAUTHENTICATED, len(still_open)


# ------------------------------------------------------------------------------ token expiry


def test_a_websocket_through_the_endpoint_ends_when_its_token_expires(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    # 3 "minutes" of 2 s on this server: time enough to open the socket, then it expires.
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"], minutes=3)

    async def talk() -> tuple[str, int | None, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                f"{endpoint_server.url}/ws",
                headers={"Host": echo_vm["endpoint"]},
                protocols=("lambda-microvms", f"lambda-microvms.authentication.{token}"),
            ) as ws,
        ):
            await ws.send_str("hello")
            echoed = (await ws.receive()).data
            # Then nothing from either side: the session ends by itself.
            message = await asyncio.wait_for(ws.receive(), 60)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), message
            return echoed, ws.close_code, str(message.extra)

    echoed, code, reason = asyncio.run(talk())
    assert echoed == "hello"
    assert (code, reason) == (1008, "token expired")


def test_a_shell_session_ends_when_its_token_expires(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    token = _shell_token(endpoint_server, echo_vm, minutes=3)  # 6 s on this server

    async def session() -> tuple[int | None, str]:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"{endpoint_server.url}/shell",
                headers={"Host": echo_vm["endpoint"]},
                protocols=_shell_protocols(token),
            ) as ws,
        ):
            assert json.loads((await ws.receive()).data)["type"] == "session_init"
            while True:  # terminal output (a prompt) until the server closes
                message = await asyncio.wait_for(ws.receive(), 60)
                if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    return ws.close_code, str(message.extra)

    assert asyncio.run(session()) == (1008, "token expired")
