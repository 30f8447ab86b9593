"""The per-MicroVM endpoint through the real server (spec §5.3–5.6, appendix B): tokens, ports,
header stripping, streaming both ways, WebSocket, auto-resume, idle accounting and the shell."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.endpoint.conftest import run_microvm
from tests.support.endpoint import auth_token, call
from tests.support.images import (
    wait_microvm,
)
from tests.support.server import ServerProcess

NO_INGRESS = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:NO_INGRESS"

# Also run on a cluster of API replicas and host agents (tests/conftest.py).
CLUSTER_TESTED = True


def _all_ports_token(server: ServerProcess, vm: dict[str, Any]) -> str:
    return auth_token(server.client(), vm["microvmId"], [{"allPorts": {}}])


def test_authentication_refusals(
    endpoint_server: ServerProcess, echo_image: str, echo_vm: dict[str, Any]
) -> None:
    server, vm = endpoint_server, echo_vm
    client = server.client()
    good = auth_token(client, vm["microvmId"])
    assert call(server, vm["endpoint"], good, "/headers").status == 200
    for token in (
        None,
        "",
        "garbage",
        good[: len(good) // 2],
        good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB"),
    ):
        response = call(server, vm["endpoint"], token, "/headers")
        assert (response.status, response.body) == (403, b"Request missing authentication"), token
    other = run_microvm(server, echo_image)
    try:
        foreign = auth_token(client, other["microvmId"])
        response = call(server, vm["endpoint"], foreign, "/headers")
        assert (response.status, response.body) == (403, b"Token authentication failed")
    finally:
        client.terminate_microvm(microvmIdentifier=other["microvmId"])
    nowhere = f"{uuid.uuid4()}.lambda-microvm.us-east-1.localhost"
    response = call(server, nowhere, good, "/headers")
    assert (response.status, response.body) == (403, b"Token authentication failed")
    # A port outside the token.
    response = call(server, vm["endpoint"], good, "/headers", headers={"X-aws-proxy-port": "9090"})
    assert response.status == 403 and b"9090" in response.body
    # A shell token is not an endpoint token.
    shell = client.create_microvm_shell_auth_token(microvmIdentifier=vm["microvmId"], expirationInMinutes=5)
    response = call(server, vm["endpoint"], shell["authToken"]["X-aws-proxy-auth"], "/headers")
    assert (response.status, response.body) == (403, b"Token authentication failed")


def test_tokens_expire(endpoint_server: ServerProcess, echo_vm: dict[str, Any]) -> None:
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"], minutes=1)  # 2 s on this server
    assert call(endpoint_server, echo_vm["endpoint"], token, "/headers").status == 200
    time.sleep(2.5)
    response = call(endpoint_server, echo_vm["endpoint"], token, "/headers")
    assert (response.status, response.body) == (403, b"Token expired")


def test_bad_requests(endpoint_server: ServerProcess, echo_vm: dict[str, Any]) -> None:
    server, vm = endpoint_server, echo_vm
    token = _all_ports_token(server, vm)
    for port in ("abc", "0", "70000", "80 80"):
        response = call(server, vm["endpoint"], token, "/headers", headers={"X-aws-proxy-port": port})
        assert response.status == 400, port
    # Nothing listens on this port inside the MicroVM.
    response = call(server, vm["endpoint"], token, "/headers", headers={"X-aws-proxy-port": "7777"})
    assert (response.status, response.body) == (502, b"")
    # Smuggling attempts: two Hosts, or both Content-Length and Transfer-Encoding.
    raw = (
        f"GET /headers HTTP/1.1\r\nHost: {vm['endpoint']}\r\nHost: other\r\nX-aws-proxy-auth: {token}\r\n\r\n"
    )
    assert _raw(server, raw).split(b"\r\n")[0].endswith(b" 400 Bad Request")
    raw = (
        f"POST /upload HTTP/1.1\r\nHost: {vm['endpoint']}\r\nX-aws-proxy-auth: {token}\r\n"
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert _raw(server, raw).split(b"\r\n")[0].endswith(b" 400 Bad Request")


def _raw(server: ServerProcess, request: str) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(request.encode())
        chunks = []
        while data := connection.recv(65536):
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def test_ports_and_header_stripping(endpoint_server: ServerProcess, echo_vm: dict[str, Any]) -> None:
    server, vm = endpoint_server, echo_vm
    token = _all_ports_token(server, vm)
    default = json.loads(
        call(
            server,
            vm["endpoint"],
            token,
            "/headers",
            headers={"X-aws-proxy-force-something": "x", "X-Custom": "kept"},
        ).body
    )
    assert default["port"] == 8080 and default["client"] == "127.0.0.1"
    names = {name.lower(): value for name, value in default["headers"]}
    assert not [name for name in names if name.startswith("x-aws-proxy-")]
    assert names["x-custom"] == "kept"
    assert names["host"].startswith(vm["endpoint"])
    assert names["x-amzn-requestid"]
    other = json.loads(
        call(server, vm["endpoint"], token, "/headers", headers={"X-aws-proxy-port": "9090"}).body
    )
    assert other["port"] == 9090


def test_streaming_both_ways_without_buffering(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    server, vm = endpoint_server, echo_vm
    token = auth_token(server.client(), vm["microvmId"])
    size = 50 * 1024 * 1024
    before = _peak_rss(server)
    response = call(server, vm["endpoint"], token, f"/download?bytes={size}")
    assert response.status == 200 and len(response.body) == size
    expected = hashlib.sha256((bytes(range(256)) * 256 * (size // 65536 + 1))[:size]).hexdigest()
    assert hashlib.sha256(response.body).hexdigest() == expected

    def body() -> Iterator[bytes]:  # sent chunked: no Content-Length
        pattern = bytes(range(256)) * 4096
        for _ in range(size // len(pattern)):
            yield pattern

    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    connection.request(
        "POST",
        "/upload",
        body=body(),
        encode_chunked=True,
        headers={"Host": vm["endpoint"], "X-aws-proxy-auth": token, "Transfer-Encoding": "chunked"},
    )
    uploaded = json.loads(connection.getresponse().read())
    assert uploaded["bytes"] == size
    # 100 MiB went through; the server's peak memory grew by far less than one body.
    assert _peak_rss(server) - before < 32 * 1024 * 1024


def _peak_rss(server: ServerProcess) -> int:
    assert server.process is not None
    for line in open(f"/proc/{server.process.pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _event_stream(server: ServerProcess, vm: dict[str, Any], query: str) -> tuple[float, list[float]]:
    """Read the echo app's /sse?`query` through the endpoint: when its head came, and when each
    event did (time.monotonic())."""
    token = auth_token(server.client(), vm["microvmId"])

    async def listen() -> tuple[float, list[float]]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{server.url}/sse?{query}", headers={"Host": vm["endpoint"], "X-aws-proxy-auth": token}
            ) as response,
        ):
            head_at = time.monotonic()
            assert response.status == 200
            arrivals = []
            async for line in response.content:
                if line.startswith(b"data:"):
                    arrivals.append(time.monotonic())
            return head_at, arrivals

    return asyncio.run(listen())


def test_server_sent_events_arrive_one_by_one(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    _, arrivals = _event_stream(endpoint_server, echo_vm, "count=4&gap=0.4")
    assert len(arrivals) == 4
    # Each event came when it was made, not all at the end.
    assert arrivals[-1] - arrivals[0] > 0.8


def test_a_response_head_is_not_held_back_for_its_body(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    """The endpoint sends a head together with a body that has already arrived; one whose body
    is late still goes out at once (a client watching an event stream sees it open)."""
    head_at, arrivals = _event_stream(endpoint_server, echo_vm, "count=1&wait=1.5")
    assert len(arrivals) == 1
    assert arrivals[0] - head_at > 1.0


def test_websocket_echo_with_subprotocol_auth(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    token = _all_ports_token(endpoint_server, echo_vm)

    async def talk() -> tuple[str, bytes, str | None]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                f"{endpoint_server.url}/ws",
                headers={"Host": echo_vm["endpoint"]},
                protocols=(
                    "lambda-microvms",
                    f"lambda-microvms.authentication.{token}",
                    "lambda-microvms.port.9090",
                    "chat",
                ),
            ) as ws,
        ):
            await ws.send_str("hello")
            text = (await ws.receive()).data
            await ws.send_bytes(b"\x00\x01" * 40000)
            binary = (await ws.receive()).data
            return text, binary, ws.protocol

    text, binary, protocol = asyncio.run(talk())
    assert text == "hello" and binary == b"\x00\x01" * 40000
    assert protocol == "chat"  # ours were stripped; the app chose among what was left


def test_suspended_and_terminated_microvms_answer_502(
    endpoint_server: ServerProcess, echo_image: str
) -> None:
    client = endpoint_server.client()
    vm = run_microvm(endpoint_server, echo_image)
    token = auth_token(client, vm["microvmId"])
    client.suspend_microvm(microvmIdentifier=vm["microvmId"])
    wait_microvm(client, vm["microvmId"], {"SUSPENDED"})
    response = call(endpoint_server, vm["endpoint"], token, "/headers")
    assert (response.status, response.body) == (502, b"")
    assert client.get_microvm(microvmIdentifier=vm["microvmId"])["state"] == "SUSPENDED"
    client.terminate_microvm(microvmIdentifier=vm["microvmId"])
    wait_microvm(client, vm["microvmId"], {"TERMINATED"})
    response = call(endpoint_server, vm["endpoint"], token, "/headers")
    assert (response.status, response.body) == (502, b"")


def test_no_ingress_has_no_endpoint(endpoint_server: ServerProcess, echo_image: str) -> None:
    client = endpoint_server.client()
    vm = run_microvm(endpoint_server, echo_image, ingressNetworkConnectors=[NO_INGRESS])
    try:
        with pytest.raises(Exception, match="NO_INGRESS"):
            auth_token(client, vm["microvmId"])
        response = call(endpoint_server, vm["endpoint"], "anything", "/headers")
        assert response.status == 403
    finally:
        client.terminate_microvm(microvmIdentifier=vm["microvmId"])


def test_auto_resume_keeps_memory_and_concurrent_requests_share_one_resume(
    endpoint_server: ServerProcess, hooked_image: str
) -> None:
    client = endpoint_server.client(validate=False)
    vm = run_microvm(
        endpoint_server,
        hooked_image,
        idlePolicy={
            "maxIdleDurationSeconds": 600,
            "suspendedDurationSeconds": 600,
            "autoResumeEnabled": True,
        },
    )
    token = auth_token(client, vm["microvmId"])
    before = json.loads(call(endpoint_server, vm["endpoint"], token).body)
    client.suspend_microvm(microvmIdentifier=vm["microvmId"])
    wait_microvm(client, vm["microvmId"], {"SUSPENDED"})

    async def burst() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:

            async def one() -> dict[str, Any]:
                async with session.get(
                    f"{endpoint_server.url}/", headers={"Host": vm["endpoint"], "X-aws-proxy-auth": token}
                ) as response:
                    assert response.status == 200
                    return await response.json()

            return await asyncio.gather(*(one() for _ in range(5)))

    answers = asyncio.run(burst())
    assert {a["id"] for a in answers} == {before["id"]}
    assert sorted(a["counter"] for a in answers) == list(range(before["counter"] + 1, before["counter"] + 6))
    assert {a["hooks"]["resume"] for a in answers} == {1}  # one resume served all five
    assert client.get_microvm(microvmIdentifier=vm["microvmId"])["state"] == "RUNNING"
    client.terminate_microvm(microvmIdentifier=vm["microvmId"])


def test_idle_suspension_counts_endpoint_bytes(endpoint_server: ServerProcess, echo_image: str) -> None:
    client = endpoint_server.client(validate=False)
    vm = run_microvm(
        endpoint_server,
        echo_image,
        idlePolicy={"maxIdleDurationSeconds": 2, "suspendedDurationSeconds": 600, "autoResumeEnabled": False},
    )
    token = auth_token(client, vm["microvmId"])
    # A stream sending an event every 0.5 s for 5 s keeps the MicroVM running past its idle limit.
    response = call(endpoint_server, vm["endpoint"], token, "/sse?count=10&gap=0.5")
    assert response.status == 200 and response.body.count(b"data:") == 10
    assert client.get_microvm(microvmIdentifier=vm["microvmId"])["state"] == "RUNNING"
    # Then silence: suspended.
    wait_microvm(client, vm["microvmId"], {"SUSPENDED"}, timeout=30)
    client.terminate_microvm(microvmIdentifier=vm["microvmId"])


def test_shell_runs_a_command(endpoint_server: ServerProcess, echo_vm: dict[str, Any]) -> None:
    client = endpoint_server.client()
    token = client.create_microvm_shell_auth_token(
        microvmIdentifier=echo_vm["microvmId"], expirationInMinutes=5
    )["authToken"]["X-aws-proxy-auth"]

    async def session() -> str:
        output = b""
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"{endpoint_server.url}/shell",
                headers={"Host": echo_vm["endpoint"]},
                protocols=(
                    "lambda-microvms",
                    f"lambda-microvms.authentication.{token}",
                    "lambda-microvms.port.8022",
                ),
            ) as ws,
        ):
            first = await ws.receive()
            assert json.loads(first.data)["type"] == "session_init"
            await ws.send_str(json.dumps({"type": "resize", "rows": 30, "cols": 100}))
            await ws.send_bytes(b"echo $((6*7)); exit\n")
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    output += message.data
                elif message.type == aiohttp.WSMsgType.TEXT:
                    assert json.loads(message.data) == {"type": "exit", "status": 0}
        return output.decode(errors="replace")

    output = asyncio.run(asyncio.wait_for(session(), 60))
    assert "42" in output.replace("$((6*7))", "")


def test_a_sandbox_cannot_reach_the_server(endpoint_server: ServerProcess, echo_vm: dict[str, Any]) -> None:
    """Neither the host's loopback nor its own address: the endpoint of another MicroVM is only
    reachable through the server, with a token."""
    client = endpoint_server.client()
    token = client.create_microvm_shell_auth_token(
        microvmIdentifier=echo_vm["microvmId"], expirationInMinutes=5
    )["authToken"]["X-aws-proxy-auth"]
    host_address = socket.gethostbyname(socket.gethostname())
    probe = (
        "import socket\n"
        f"for host, port in [('127.0.0.1', {endpoint_server.port}), ('{host_address}', {endpoint_server.port})]:\n"
        "    s = socket.socket(); s.settimeout(2)\n"
        "    try:\n"
        "        s.connect((host, port)); print('REACHED', host)\n"
        "    except OSError as e:\n"
        "        print('BLOCKED', host, type(e).__name__)\n"
    )

    async def session() -> str:
        output = b""
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"{endpoint_server.url}/shell",
                headers={"Host": echo_vm["endpoint"]},
                protocols=("lambda-microvms", f"lambda-microvms.authentication.{token}"),
            ) as ws,
        ):
            await ws.receive()
            await ws.send_bytes(f'python3 -c "$(echo {_b64(probe)} | base64 -d)"; exit\n'.encode())
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    output += message.data
        return output.decode(errors="replace")

    output = asyncio.run(asyncio.wait_for(session(), 60))
    assert output.count("BLOCKED") == 2 and "REACHED" not in output, output


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()
