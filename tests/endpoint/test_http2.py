"""HTTP/2 on the endpoint: ALPN h2 over TLS and h2c with prior knowledge on the cleartext port,
every endpoint rule per stream, HTTP/1.1 apps reached as HTTP/1.1, and what a client that breaks
the protocol gets (real clients: httpx, curl, the h2 library on a raw socket)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx

from tests.endpoint.conftest import HTTP, idle_policy_microvm, run_microvm
from tests.support.endpoint import auth_token
from tests.support.images import wait_microvm
from tests.support.server import ServerProcess

PATTERN = bytes(range(256)) * 256
STREAMS = 100


def _ca(server: ServerProcess) -> str:
    return str(server.data_dir / "tls" / "ca.pem")


def _headers(vm: dict[str, Any], port: int, token: str | None, **extra: str) -> dict[str, str]:
    headers = {"Host": f"{vm['endpoint']}:{port}", **extra}
    if token is not None:
        headers["X-aws-proxy-auth"] = token
    return headers


def _h2c(server: ServerProcess) -> httpx.Client:
    """HTTP/2 with prior knowledge (no upgrade, no TLS)."""
    return httpx.Client(http1=False, http2=True, base_url=f"http://127.0.0.1:{server.port}", timeout=30)


class RawH2:
    """An HTTP/2 client on a raw socket, for what polite clients never send (its h2 checks
    nothing it sends)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        config = h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.connection = h2.connection.H2Connection(config)
        self.connection.initiate_connection()
        self.flush()
        self.responses: dict[int, dict[str, Any]] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None

    def flush(self) -> None:
        if data := self.connection.data_to_send():
            self.sock.sendall(data)

    def request(self, headers: list[tuple[str, str]], body: bytes | None = None) -> int:
        stream_id = self.connection.get_next_available_stream_id()
        self.connection.send_headers(stream_id, headers, end_stream=body is None)
        if body is not None:
            size = self.connection.max_outbound_frame_size
            for start in range(0, len(body), size):
                last = start + size >= len(body)
                self.connection.send_data(stream_id, body[start : start + size], end_stream=last)
        self.flush()
        self.responses[stream_id] = {"headers": {}, "body": b"", "ended": False, "reset": None}
        return stream_id

    def pump(self, until: Any, timeout: float = 15) -> None:
        """Read until until() is true, the server ends the connection, or the timeout."""
        deadline = time.monotonic() + timeout
        while not until() and self.terminated is None and time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ConnectionError, ssl.SSLError):
                return
            if not data:
                return
            for event in self.connection.receive_data(data):
                self._record(event)
            self.flush()

    def _record(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event
            return
        response = self.responses.get(getattr(event, "stream_id", 0))
        if response is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            response["headers"] = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h2.events.DataReceived):
            response["body"] += event.data
            self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            response["ended"] = True
        elif isinstance(event, h2.events.StreamReset):
            response["reset"] = event.error_code

    def answer(self, stream_id: int) -> tuple[int, bytes]:
        response = self.responses[stream_id]
        self.pump(lambda: response["ended"] or response["reset"] is not None)
        assert response["ended"], f"stream {stream_id}: no answer ({response}, {self.terminated})"
        return int(response["headers"][":status"]), response["body"]

    def close(self) -> None:
        self.sock.close()


@contextmanager
def raw_h2(port: int) -> Iterator[RawH2]:
    client = RawH2(port)
    try:
        yield client
    finally:
        client.close()


def _request(
    vm: dict[str, Any], server: ServerProcess, path: str = "/headers", **headers: str
) -> list[tuple[str, str]]:
    return [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", f"{vm['endpoint']}:{server.port}"),
        (":path", path),
        *headers.items(),
    ]


def test_h2c_with_prior_knowledge_reaches_an_http1_app_as_http1(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"])
    with _h2c(endpoint_server) as client:
        got = client.get(
            "/headers", headers=_headers(echo_vm, endpoint_server.port, token, **{"X-Custom": "kept"})
        )
        assert (got.http_version, got.status_code) == ("HTTP/2", 200), got.text
        seen = {name.lower(): value for name, value in got.json()["headers"]}
        assert seen["host"] == f"{echo_vm['endpoint']}:{endpoint_server.port}"
        assert seen["x-custom"] == "kept" and "x-amzn-requestid" in seen
        assert not [name for name in seen if name.startswith("x-aws-proxy-")]
        # A body larger than a stream's window goes up (chunked: the client gave no length) ...
        body = PATTERN * 16  # 1 MiB
        posted = client.post(
            "/upload",
            content=iter([body[:300_000], body[300_000:]]),
            headers=_headers(echo_vm, endpoint_server.port, token),
        )
        assert posted.status_code == 200, posted.text
        assert posted.json()["sha256"] == hashlib.sha256(body).hexdigest()
        # ... and one comes down.
        download = client.get(
            "/download?bytes=3000000", headers=_headers(echo_vm, endpoint_server.port, token)
        )
        assert download.status_code == 200 and len(download.content) == 3_000_000
        assert download.content == (PATTERN * 46)[:3_000_000]


def test_many_streams_at_once_on_one_connection(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    """More streams than the relay opens connections to an HTTP/1.1 app (16): the rest wait their
    turn on the connections kept for them, and every one is answered."""
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"])
    headers = _headers(echo_vm, endpoint_server.port, token)

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            http1=False, http2=True, base_url=f"http://127.0.0.1:{endpoint_server.port}", timeout=30
        ) as client:
            return await asyncio.gather(
                *(client.get(f"/download?bytes={1000 * n}", headers=headers) for n in range(1, STREAMS + 1))
            )

    answers = asyncio.run(all_at_once())
    assert [(answer.status_code, len(answer.content)) for answer in answers] == [
        (200, 1000 * n) for n in range(1, STREAMS + 1)
    ]
    assert {answer.http_version for answer in answers} == {"HTTP/2"}


def test_tls_offers_h2_to_endpoints_and_http1_to_the_api(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    tls_port = endpoint_server.settings["tls_port"]
    for name, expected in ((echo_vm["endpoint"], "h2"), ("localhost", "http/1.1")):
        context = ssl.create_default_context(cafile=_ca(endpoint_server))
        context.set_alpn_protocols(["h2", "http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", tls_port)) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            assert tls.selected_alpn_protocol() == expected, name
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"])
    # httpx connects to the URL's host: 127.0.0.1, naming the endpoint in SNI and :authority.
    verify = ssl.create_default_context(cafile=_ca(endpoint_server))
    with httpx.Client(http2=True, verify=verify, timeout=30) as client:
        got = client.get(
            f"https://127.0.0.1:{tls_port}/headers",
            headers={"Host": f"{echo_vm['endpoint']}:{tls_port}", "X-aws-proxy-auth": token},
            extensions={"sni_hostname": echo_vm["endpoint"]},
        )
        assert (got.http_version, got.status_code) == ("HTTP/2", 200), got.text
    # The API over the same listener still speaks HTTP/1.1 (a client of its own: httpx would
    # send this on the endpoint's HTTP/2 connection, which answers 421 for the API).
    with httpx.Client(http2=True, verify=verify, timeout=30) as client:
        api = client.get(f"https://localhost:{tls_port}/metrics")
        assert (api.http_version, api.status_code) == ("HTTP/1.1", 200)


def test_curl_http2_and_prior_knowledge(endpoint_server: ServerProcess, echo_vm: dict[str, Any]) -> None:
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"])
    tls_port = endpoint_server.settings["tls_port"]
    endpoint = echo_vm["endpoint"]
    common = [
        "curl",
        "-sS",
        "--max-time",
        "30",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}",
        "-H",
        f"X-aws-proxy-auth: {token}",
    ]
    over_tls = subprocess.run(
        [
            *common,
            "--http2",
            "--cacert",
            _ca(endpoint_server),
            "--resolve",
            f"{endpoint}:{tls_port}:127.0.0.1",
            f"https://{endpoint}:{tls_port}/headers",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert over_tls.stdout == "2 200", over_tls.stderr
    prior = subprocess.run(
        [
            *common,
            "--http2-prior-knowledge",
            "--resolve",
            f"{endpoint}:{endpoint_server.port}:127.0.0.1",
            f"http://{endpoint}:{endpoint_server.port}/headers",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert prior.stdout == "2 200", prior.stderr


def test_every_stream_is_checked_on_its_own(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any], echo_image: str
) -> None:
    client = endpoint_server.client()
    token = auth_token(client, echo_vm["microvmId"])
    other = run_microvm(endpoint_server, echo_image, ingressNetworkConnectors=[HTTP])
    try:
        other_token = auth_token(client, other["microvmId"])
        with raw_h2(endpoint_server.port) as h2c:
            missing = h2c.request(_request(echo_vm, endpoint_server))
            wrong_port = h2c.request(
                _request(echo_vm, endpoint_server, **{"x-aws-proxy-auth": token, "x-aws-proxy-port": "9090"})
            )
            good = h2c.request(_request(echo_vm, endpoint_server, **{"x-aws-proxy-auth": token}))
            stranger = h2c.request(_request(echo_vm, endpoint_server, **{"x-aws-proxy-auth": other_token}))
            to_other = h2c.request(_request(other, endpoint_server, **{"x-aws-proxy-auth": other_token}))
            api = h2c.request(
                [
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":authority", f"127.0.0.1:{endpoint_server.port}"),
                    (":path", "/metrics"),
                ]
            )
            bad_port = h2c.request(
                _request(echo_vm, endpoint_server, **{"x-aws-proxy-auth": token, "x-aws-proxy-port": "http"})
            )
            assert h2c.answer(missing) == (403, b"Request missing authentication")
            status, body = h2c.answer(wrong_port)
            assert status == 403 and b"9090" in body
            status, body = h2c.answer(good)
            assert status == 200 and not [
                n for n, _ in json.loads(body)["headers"] if n.lower().startswith("x-aws-proxy")
            ]
            assert h2c.answer(stranger) == (403, b"Token authentication failed")
            assert h2c.answer(to_other)[0] == 200  # two MicroVMs on one connection, each with its token
            assert h2c.answer(api)[0] == 421
            assert h2c.answer(bad_port)[0] == 400
            # After all those refusals the connection still serves.
            assert (
                h2c.answer(h2c.request(_request(echo_vm, endpoint_server, **{"x-aws-proxy-auth": token})))[0]
                == 200
            )
            assert h2c.terminated is None
    finally:
        client.terminate_microvm(microvmIdentifier=other["microvmId"])


def test_a_request_line_no_http1_app_could_read_is_refused(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    """HTTP/2 framing lets a space into :method or :path; as an HTTP/1.1 request line it would
    split where the app's parser chooses. Each such stream gets 400; the connection goes on."""
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"])
    with raw_h2(endpoint_server.port) as client:
        authority = f"{echo_vm['endpoint']}:{endpoint_server.port}"
        auth = {"x-aws-proxy-auth": token}
        refused = [
            _request(echo_vm, endpoint_server, "/headers HTTP/1.1", **auth),
            [(":method", "G ET"), *_request(echo_vm, endpoint_server, **auth)[1:]],
            _request(echo_vm, endpoint_server, "headers", **auth),
            # A tunnel (CONNECT has no :scheme or :path): none over HTTP/2 here.
            [(":method", "CONNECT"), (":authority", authority), *auth.items()],
        ]
        for headers in refused:
            status, body = client.answer(client.request(headers))
            assert status == 400, (headers[:4], status, body)
        assert (
            client.answer(client.request(_request(echo_vm, endpoint_server, **{"x-aws-proxy-auth": token})))[
                0
            ]
            == 200
        )


def test_refused_streams_give_back_their_window(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    """Bodies of refused streams (403: no token) are never read; their bytes still count against
    the connection's window (4 MiB) until given back. 25 of 200 KB each, then a request that
    must still get through on the same connection."""
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"])
    with raw_h2(endpoint_server.port) as client:
        client.pump(lambda: client.connection.outbound_flow_control_window > 65535, timeout=10)
        post = [
            (n, "POST") if n == ":method" else (n, v)
            for n, v in _request(echo_vm, endpoint_server, "/upload")
        ]
        for _ in range(25):
            stream_id = client.request(post, body=b"x" * 200_000)
            assert client.answer(stream_id) == (403, b"Request missing authentication")
        assert (
            client.answer(client.request(_request(echo_vm, endpoint_server, **{"x-aws-proxy-auth": token})))[
                0
            ]
            == 200
        )


def test_a_huge_header_block_ends_that_connection_only(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"])
    with raw_h2(endpoint_server.port) as bad, raw_h2(endpoint_server.port) as good:
        bad.request(_request(echo_vm, endpoint_server, **{"x-aws-proxy-auth": token, "x-big": "a" * 200_000}))
        bad.pump(lambda: False, timeout=10)
        assert bad.terminated is not None, "a 200 KB header block was accepted"
        assert (
            good.answer(good.request(_request(echo_vm, endpoint_server, **{"x-aws-proxy-auth": token})))[0]
            == 200
        )


def test_a_malformed_frame_gets_goaway(endpoint_server: ServerProcess, echo_vm: dict[str, Any]) -> None:
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"])
    with raw_h2(endpoint_server.port) as bad:
        # A SETTINGS frame on a stream (settings belong to the connection): a PROTOCOL_ERROR.
        bad.sock.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x01")
        bad.pump(lambda: False, timeout=10)
        assert bad.terminated is not None and bad.terminated.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    with raw_h2(endpoint_server.port) as good:
        assert (
            good.answer(good.request(_request(echo_vm, endpoint_server, **{"x-aws-proxy-auth": token})))[0]
            == 200
        )


def test_a_stream_flood_is_refused(endpoint_server: ServerProcess, echo_vm: dict[str, Any]) -> None:
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"])
    # More streams at once than the server's SETTINGS allow (100), sent before reading them:
    # a polite client's h2 would hold the extra ones back.
    with raw_h2(endpoint_server.port) as flood:
        for _ in range(120):
            stream_id = flood.connection.get_next_available_stream_id()
            flood.connection.send_headers(
                stream_id,
                _request(echo_vm, endpoint_server, "/sse?count=1&gap=30", **{"x-aws-proxy-auth": token}),
            )
        flood.flush()
        flood.pump(lambda: False, timeout=10)
        assert flood.terminated is not None, "more streams than SETTINGS allow were taken"
    # The rapid-reset pattern: streams opened and reset at once, never more than one open.
    with raw_h2(endpoint_server.port) as resets:
        for _ in range(400):
            stream_id = resets.connection.get_next_available_stream_id()
            resets.connection.send_headers(
                stream_id, _request(echo_vm, endpoint_server, **{"x-aws-proxy-auth": token})
            )
            resets.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        resets.flush()
        resets.pump(lambda: False, timeout=10)
        assert resets.terminated is not None
        assert resets.terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    with raw_h2(endpoint_server.port) as good:
        assert (
            good.answer(good.request(_request(echo_vm, endpoint_server, **{"x-aws-proxy-auth": token})))[0]
            == 200
        )


def test_a_suspended_microvm_resumes_for_a_stream(endpoint_server: ServerProcess, echo_image: str) -> None:
    client = endpoint_server.client(client_side_validation=False, validate=False)
    with idle_policy_microvm(endpoint_server, echo_image, 3600, auto_resume=True) as vm:
        token = auth_token(client, vm["microvmId"])
        client.suspend_microvm(microvmIdentifier=vm["microvmId"])
        wait_microvm(client, vm["microvmId"], {"SUSPENDED"})
        with _h2c(endpoint_server) as h2client:
            got = h2client.get("/headers", headers=_headers(vm, endpoint_server.port, token))
            assert (got.http_version, got.status_code) == ("HTTP/2", 200)
        assert client.get_microvm(microvmIdentifier=vm["microvmId"])["state"] == "RUNNING"
