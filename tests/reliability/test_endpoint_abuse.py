"""Abuse of the per-MicroVM endpoint: forged and expired tokens, port escalation, header smuggling
(duplicate Host, a second X-aws-proxy-auth, requests hidden in headers or bodies, Content-Length
with Transfer-Encoding, obs-fold) and slowloris clients. All are refused without a byte reaching
the app that should not, and without disturbing the MicroVMs of others.

The slowloris clients start with the module and trickle a byte a second while the other tests
run (proving they block nobody); the last tests check that the server dropped them."""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.reliability.conftest import TOKEN_MINUTE_SECONDS
from tests.reliability.microvms import Fleet
from tests.reliability.rawhttp import Trickler, exchange
from tests.support.endpoint import auth_token, call
from tests.support.http import read_one_response
from tests.support.server import ServerProcess

HEAD_TIMEOUT = 30.0  # openmicrovm/endpoint/proxy.py
SLOWLORIS_GRACE = 12.0  # what the drop may take beyond the head timeout on a busy machine
MISSING = b"Request missing authentication"
FAILED = b"Token authentication failed"


@dataclass
class Target:
    vm: dict[str, Any]
    token: str  # port 8080 only, long-lived

    @property
    def host(self) -> str:
        return self.vm["endpoint"]


@pytest.fixture(scope="module")
def fleet_of_two(hostile_server: ServerProcess, tenant_image: str) -> Iterator[tuple[Target, Target]]:
    running = Fleet(hostile_server.client())
    try:
        pair = []
        for _ in range(2):
            vm = running.run(tenant_image)
            pair.append(Target(vm, auth_token(hostile_server.client(), vm["microvmId"], minutes=60)))
        yield pair[0], pair[1]
    finally:
        running.terminate_all()


@pytest.fixture(scope="module")
def slowloris(
    hostile_server: ServerProcess, fleet_of_two: tuple[Target, Target]
) -> Iterator[dict[str, Trickler]]:
    victim, _ = fleet_of_two
    port = hostile_server.port
    endless = "X-Pad: " + "a" * 4000 + "\r\n"  # never completes while the test watches
    first_api = ("GET /2025-09-09/managed-microvm-images HTTP/1.1\r\nHost: 127.0.0.1\r\n" + endless).encode()
    first_endpoint = (f"GET /count HTTP/1.1\r\nHost: {victim.host}\r\n" + endless).encode()
    tricklers = {f"api head {i}": Trickler(port, first_api) for i in range(10)}
    tricklers.update({f"endpoint head {i}": Trickler(port, first_endpoint) for i in range(10)})
    tricklers["endpoint second head"] = _KeptAlive(
        port,
        f"GET /count HTTP/1.1\r\nHost: {victim.host}\r\nX-aws-proxy-auth: {victim.token}\r\n\r\n".encode(),
        first_endpoint,
    )
    tricklers["api second head"] = _KeptAlive(
        port, b"GET /2025-09-09/managed-microvm-images HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", first_api
    )
    for trickler in tricklers.values():
        trickler.start()
    for trickler in tricklers.values():  # their first, complete requests are answered before tests count
        if isinstance(trickler, _KeptAlive):
            assert trickler.answered.wait(30)
    yield tricklers
    for trickler in tricklers.values():
        trickler.stop()


class _KeptAlive(Trickler):
    """Sends one complete request at once, then trickles the next request's head."""

    def __init__(self, port: int, first: bytes, then: bytes) -> None:
        super().__init__(port, then)
        self.first = first
        self.answered = threading.Event()

    def _run(self) -> None:
        self.started = time.monotonic()
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(self.first)
            self.answer = read_one_response(sock)
            self.answered.set()
        except OSError:
            self.closed_after = 0.0
            return
        sock.settimeout(self.interval)
        self.started = time.monotonic()
        try:
            for byte in self.payload:
                if self._stop.is_set():
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                if self._drained(sock):
                    break
        finally:
            if self.closed_after is None and not self._stop.is_set():
                self.closed_after = time.monotonic() - self.started
            sock.close()


def _send(server: ServerProcess, raw: bytes, timeout: float = 15.0) -> Any:
    return exchange(server.port, raw, timeout=timeout, linger=1.0)


def _count(server: ServerProcess, target: Target, port: int = 8080) -> int:
    headers = {"X-aws-proxy-port": str(port)} if port != 8080 else {}
    token = (
        target.token
        if port == 8080
        else auth_token(server.client(), target.vm["microvmId"], [{"allPorts": {}}])
    )
    response = call(server, target.host, token, "/count", headers=headers)
    assert response.status == 200, (response.status, response.body)
    return int(json.loads(response.body)["count"])


# ------------------------------------------------------------------------------ tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _forged(header: dict[str, Any] | Any, claims: dict[str, Any], key: bytes | None = None) -> str:
    """A compact JWE in our format, sealed with a key the server never had."""
    protected = _b64(json.dumps(header).encode())
    iv = secrets.token_bytes(12)
    sealed = AESGCM(key or AESGCM.generate_key(bit_length=256)).encrypt(
        iv, json.dumps(claims).encode(), protected.encode()
    )
    return ".".join([protected, "", _b64(iv), _b64(sealed[:-16]), _b64(sealed[-16:])])


def _flip(token: str, part: int) -> str:
    parts = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(parts[part] + "=" * (-len(parts[part]) % 4)))
    raw[len(raw) // 2] ^= 0x01
    parts[part] = _b64(bytes(raw))
    return ".".join(parts)


def test_forged_and_tampered_tokens_are_refused(
    hostile_server: ServerProcess, fleet_of_two: tuple[Target, Target], slowloris: dict[str, Trickler]
) -> None:
    victim, _ = fleet_of_two
    before = _count(hostile_server, victim)
    real_header = json.loads(base64.urlsafe_b64decode(victim.token.split(".")[0] + "=="))
    claims = {
        "acct": "000000000000",
        "vm": victim.vm["microvmId"],
        "ports": [[1, 65535]],
        "kind": "endpoint",
        "iat": time.time(),
        "exp": time.time() + 3600,
        "jti": "x",
    }
    forgeries = [
        "x" * 1000,
        "." * 4,
        "a.b.c.d.e",
        victim.token + "A",
        victim.token.replace(".", "..", 1),
        _flip(victim.token, 0),
        _flip(victim.token, 2),
        _flip(victim.token, 3),
        _flip(victim.token, 4),
        _forged(real_header, claims),  # the right kid, a key of our own
        _forged({**real_header, "alg": "none"}, claims),
        _forged({**real_header, "enc": "A128GCM"}, claims),
        _forged({**real_header, "kid": "00000000-0000-0000-0000-000000000000"}, claims),
        _forged({"alg": "dir", "enc": "A256GCM"}, claims),
        ".".join([*victim.token.split(".")[:3], "", ""]),
        "Bearer " + victim.token,
        victim.token + " " + victim.token,
        "\t" * 3,
        "é" * 20,
    ]
    for forged in forgeries:
        response = call(hostile_server, victim.host, forged, "/count")
        assert (response.status, response.body) == (403, MISSING), (
            forged[:80],
            response.status,
            response.body,
        )
    assert _count(hostile_server, victim) == before + 1  # only our own counting call got through


def test_a_token_whose_header_is_not_an_object_gets_a_403(
    hostile_server: ServerProcess, fleet_of_two: tuple[Target, Target]
) -> None:
    victim, _ = fleet_of_two
    for header in ("MQ", "W10", "bnVsbA"):  # 1, [], null
        token = f"{header}..AAAAAAAAAAAAAAAA.AAAA.AAAAAAAAAAAAAAAAAAAAAA"
        response = _send(
            hostile_server,
            f"GET /count HTTP/1.1\r\nHost: {victim.host}\r\nX-aws-proxy-auth: {token}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert response.status == 403, (header, response)


def test_tokens_of_other_microvms_or_kinds_are_refused(
    hostile_server: ServerProcess, fleet_of_two: tuple[Target, Target], slowloris: dict[str, Trickler]
) -> None:
    victim, other = fleet_of_two
    assert call(hostile_server, victim.host, other.token, "/count").body == FAILED
    assert call(hostile_server, other.host, victim.token, "/count").body == FAILED
    # An endpoint of no MicroVM at all, with a real token.
    nowhere = "00000000-0000-0000-0000-000000000000.lambda-microvm.us-east-1.localhost"
    assert call(hostile_server, nowhere, victim.token, "/count").body == FAILED
    # Another region's spelling of the same endpoint names no MicroVM.
    elsewhere = victim.host.replace(".us-east-1.", ".us-west-2.")
    assert call(hostile_server, elsewhere, victim.token, "/count").status == 403


def test_an_expired_token_is_refused_even_on_a_connection_it_opened(
    hostile_server: ServerProcess, fleet_of_two: tuple[Target, Target], slowloris: dict[str, Trickler]
) -> None:
    victim, _ = fleet_of_two
    short = auth_token(
        hostile_server.client(), victim.vm["microvmId"], minutes=1
    )  # TOKEN_MINUTE_SECONDS long
    request = f"GET /count HTTP/1.1\r\nHost: {victim.host}\r\nX-aws-proxy-auth: {short}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", hostile_server.port), timeout=10) as sock:
        sock.sendall(request)
        first = read_one_response(sock)
        assert first.startswith(b"HTTP/1.1 200"), first
        time.sleep(TOKEN_MINUTE_SECONDS + 1)
        sock.sendall(request)  # a replay on the same kept-alive connection
        second = read_one_response(sock)
    assert second.startswith(b"HTTP/1.1 403"), second
    replay = call(hostile_server, victim.host, short, "/count")
    assert replay.status == 403 and b"expired" in replay.body.lower(), replay.body


# ------------------------------------------------------------------------------ ports


def test_a_token_never_reaches_a_port_it_does_not_allow(
    hostile_server: ServerProcess, fleet_of_two: tuple[Target, Target], slowloris: dict[str, Trickler]
) -> None:
    victim, _ = fleet_of_two
    before = _count(hostile_server, victim, 9090)
    ranged = auth_token(
        hostile_server.client(), victim.vm["microvmId"], [{"range": {"startPort": 8000, "endPort": 8080}}]
    )
    for token in (victim.token, ranged):
        for value in (
            "9090",
            "09090",
            "9090 ",
            "+9090",
            "9090.0",
            "0x2382",
            "8080,9090",
            "8080, 9090",
            "-1",
            "0",
            "65536",
            "99999999999999999999",
            "",
        ):
            response = _send(
                hostile_server,
                f"GET /count HTTP/1.1\r\nHost: {victim.host}\r\nX-aws-proxy-auth: {token}\r\n"
                f"X-aws-proxy-port: {value}\r\nConnection: close\r\n\r\n".encode(),
            )
            assert response.status in (400, 403), (value, response.status, response.body)
        doubled = _send(
            hostile_server,
            f"GET /count HTTP/1.1\r\nHost: {victim.host}\r\nX-aws-proxy-auth: {token}\r\n"
            "X-aws-proxy-port: 8080\r\nx-AWS-proxy-PORT: 9090\r\nConnection: close\r\n\r\n".encode(),
        )
        assert doubled.status == 400, doubled
        # The subprotocol form of the port, on a plain request and on a WebSocket upgrade.
        sub = _send(
            hostile_server,
            f"GET /count HTTP/1.1\r\nHost: {victim.host}\r\nX-aws-proxy-auth: {token}\r\n"
            "Sec-WebSocket-Protocol: lambda-microvms.port.9090\r\nConnection: close\r\n\r\n".encode(),
        )
        assert sub.status == 403, sub
        # A header the proxy does not own does not choose a port either.
        lookalike = call(hostile_server, victim.host, token, "/headers", headers={"X_aws_proxy_port": "9090"})
        assert lookalike.status == 200 and json.loads(lookalike.body)["port"] == 8080
    assert _count(hostile_server, victim, 9090) == before + 1


def test_superscript_digits_in_a_port_or_length_are_a_400(
    hostile_server: ServerProcess, fleet_of_two: tuple[Target, Target]
) -> None:
    victim, _ = fleet_of_two
    head = f"GET /count HTTP/1.1\r\nHost: {victim.host}\r\nX-aws-proxy-auth: {victim.token}\r\nConnection: close\r\n"
    for extra in ("X-aws-proxy-port: \u00b2\r\n", "Content-Length: \u00b2\r\n"):
        response = _send(hostile_server, (head + extra + "\r\n").encode("latin-1"))
        assert response.status == 400, (extra, response)


# ------------------------------------------------------------------------------ smuggling


def test_smuggling_attempts_never_reach_the_app(
    hostile_server: ServerProcess, fleet_of_two: tuple[Target, Target], slowloris: dict[str, Trickler]
) -> None:
    victim, other = fleet_of_two
    host, token = victim.host, victim.token
    auth = f"Host: {host}\r\nX-aws-proxy-auth: {token}\r\n"
    hidden = f"GET /count HTTP/1.1\r\nHost: {host}\r\n\r\n"  # no token: must never be served
    refused_outright = [
        f"GET /count HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\nX-aws-proxy-auth: {token}\r\n\r\n",
        f"GET /count HTTP/1.1\r\n{auth}X-aws-proxy-auth: {token}\r\n\r\n",
        f"GET /count HTTP/1.1\r\n{auth}x-AWS-PROXY-auth: {other.token}\r\n\r\n",
        f"POST /count HTTP/1.1\r\n{auth}Content-Length: {len(hidden)}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}",
        f"POST /count HTTP/1.1\r\n{auth}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        f"POST /count HTTP/1.1\r\n{auth}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        f"POST /count HTTP/1.1\r\n{auth}Content-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
        f"GET /count HTTP/1.1\r\n{auth}X-Folded: a\r\n X-aws-proxy-port: 9090\r\n\r\n",
        f"GET /count HTTP/1.1\r\n{auth}X-aws-proxy-port : 9090\r\n\r\n",
        f"GET /count HTTP/1.1\r\n{auth}X-Bad: a\rX-aws-proxy-port: 9090\r\n\r\n",
        f"GET /count HTTP/1.1\r\n{auth}X-Bad: a\nX-aws-proxy-port: 9090\r\n\r\n",
    ]
    before = _count(hostile_server, victim)
    for raw in refused_outright:
        answer = _send(hostile_server, raw.encode())
        assert answer.statuses and all(status in (400, 403) for status in answer.statuses), (
            raw[:160],
            answer,
        )
    assert _count(hostile_server, victim) == before + 1, "a refused request reached the app"

    # Requests hidden where a lenient parser would find them: each must be served at most as
    # the one authenticated request it is, and anything after it answered (and refused) by us.
    before = _count(hostile_server, victim)
    framed = [
        f"GET /count HTTP/1.1\r\n{auth}X-Inject: a\r\n\r\n{hidden}",
        f"POST /count HTTP/1.1\r\n{auth}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}",
        f"POST /count HTTP/1.1\r\n{auth}Content-Length: {len(hidden)}\r\n\r\n{hidden}",
        f"GET /count HTTP/1.1\r\n{auth}Content-Length: 0\r\n\r\n{hidden}",
    ]
    for raw in framed:
        answer = _send(hostile_server, raw.encode())
        assert answer.statuses[:1] == [200], (raw[:160], answer)
        assert all(status == 403 for status in answer.statuses[1:]), (raw[:160], answer.statuses)
    assert _count(hostile_server, victim) == before + len(framed) + 1


def test_a_kept_alive_connection_stays_with_its_microvm(
    hostile_server: ServerProcess, fleet_of_two: tuple[Target, Target], slowloris: dict[str, Trickler]
) -> None:
    victim, other = fleet_of_two
    before_other = _count(hostile_server, other)
    with socket.create_connection(("127.0.0.1", hostile_server.port), timeout=10) as sock:
        sock.sendall(
            f"GET /count HTTP/1.1\r\nHost: {victim.host}\r\nX-aws-proxy-auth: {victim.token}\r\n\r\n".encode()
        )
        assert read_one_response(sock).startswith(b"HTTP/1.1 200")
        # Then the other MicroVM's Host and token on the same connection.
        sock.sendall(
            f"GET /count HTTP/1.1\r\nHost: {other.host}\r\nX-aws-proxy-auth: {other.token}\r\n\r\n".encode()
        )
        answer = read_one_response(sock)
    assert not answer.startswith(b"HTTP/1.1 200") or _count(hostile_server, other) == before_other + 2, answer
    # An API connection that turns to an endpoint on its second request does not reach the app.
    before = _count(hostile_server, victim)
    answer = _send(
        hostile_server,
        (
            "GET /2025-09-09/managed-microvm-images HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            f"GET /count HTTP/1.1\r\nHost: {victim.host}\r\nX-aws-proxy-auth: {victim.token}\r\nConnection: close\r\n\r\n"
        ).encode(),
    )
    assert answer.statuses and answer.statuses[0] in (200, 403), answer
    assert _count(hostile_server, victim) in (before + 1, before + 2)


def test_reserved_headers_are_stripped_before_the_app(
    hostile_server: ServerProcess, fleet_of_two: tuple[Target, Target], slowloris: dict[str, Trickler]
) -> None:
    victim, _ = fleet_of_two
    response = call(
        hostile_server,
        victim.host,
        victim.token,
        "/headers",
        headers={
            "X-aws-proxy-tricks": "true",
            "X-aws-proxy-anything": "x",
            "X-Amzn-RequestId": "forged",
            "Sec-WebSocket-Protocol": f"lambda-microvms, lambda-microvms.authentication.{victim.token}, chat",
        },
    )
    assert response.status == 200
    seen = {name.lower(): value for name, value in json.loads(response.body)["headers"]}
    assert not [name for name in seen if name.startswith("x-aws-proxy-")]
    assert seen.get("x-amzn-requestid") != "forged"
    assert victim.token not in json.dumps(seen)


# ------------------------------------------------------------------------------ slowloris


def _wait_for_drops(slowloris: dict[str, Trickler], names: list[str]) -> dict[str, float | None]:
    deadline = max(t.started for t in slowloris.values()) + HEAD_TIMEOUT + SLOWLORIS_GRACE
    while time.monotonic() < deadline and any(slowloris[name].closed_after is None for name in names):
        time.sleep(0.5)
    return {name: slowloris[name].closed_after for name in names}


def test_slowloris_clients_block_nobody_and_are_dropped_after_the_head_timeout(
    hostile_server: ServerProcess, fleet_of_two: tuple[Target, Target], slowloris: dict[str, Trickler]
) -> None:
    victim, other = fleet_of_two
    # Served while 22 clients trickle their heads.
    assert hostile_server.client().list_managed_microvm_images()["items"]
    _count(hostile_server, victim)
    _count(hostile_server, other)
    names = [name for name in slowloris if name != "api second head"]
    drops = _wait_for_drops(slowloris, names)
    slow = {
        name: after
        for name, after in drops.items()
        if after is None or after > HEAD_TIMEOUT + SLOWLORIS_GRACE
    }
    assert slow == {}, slow
    _count(hostile_server, victim)


def test_a_slowloris_on_a_kept_alive_api_connection_is_dropped(slowloris: dict[str, Trickler]) -> None:
    drops = _wait_for_drops(slowloris, ["api second head"])
    after = drops["api second head"]
    assert after is not None and after <= HEAD_TIMEOUT + SLOWLORIS_GRACE, after
