"""A web page in the user's browser cannot drive the API: the requests a browser sends for a page
(cross-site "simple" requests, DNS-rebound requests that name the attacker's Host, preflights),
sent as raw HTTP to the real server, are refused before they reach any operation, while what
boto3, the AWS CLI and a same-origin page send is served."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import image_request
from tests.reliability.rawhttp import exchange
from tests.support.clients import aws_error
from tests.support.http import RawResponse, raw_request
from tests.support.moto import MotoServer
from tests.support.server import DatabaseBackend, ServerProcess

IMAGES = "/2025-09-09/microvm-images"
METRICS = "/metrics"
LOGS = "/_openmicrovm/logs/builds/no-such-build"
EVIL = "http://evil.example"
ENDPOINT_HOST = f"{uuid.uuid4()}.lambda-microvm.us-east-1.localhost"
# What the configured server allows (TOML for the hosts, the environment for the origins).
ALLOWED_HOSTS = "openmicrovm.lan, Build-Box.example., fe80::1"
ALLOWED_ORIGINS = "http://console.example:8080, HTTPS://Ops.Example:443/"
CONSOLE = "http://console.example:8080"


def _name() -> str:
    return f"xsite-{uuid.uuid4().hex[:8]}"


def _create(server: ServerProcess, name: str, headers: dict[str, str]) -> RawResponse:
    return raw_request(server.port, "POST", IMAGES, json.dumps(image_request(name)), headers)


def _exists(server: ServerProcess, name: str) -> bool:
    return name in {item["name"] for item in server.client().list_microvm_images(maxResults=50)["items"]}


def _cors_headers(response: RawResponse) -> list[str]:
    return [name for name in response.headers if name.startswith("access-control-")]


def _refused(response: RawResponse, status: int, code: str, *fragments: str) -> None:
    assert response.status == status, (response.status, response.body)
    assert response.error_type == code, (response.headers, response.body)
    document = response.json()
    assert set(document) == {"message"}, document
    for fragment in fragments:
        assert fragment in document["message"], document["message"]


@pytest.fixture(scope="module")
def configured(
    tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[ServerProcess]:
    """A server with extra host names (settings file) and allowed origins (environment)."""
    with database_backend.server(
        tmp_path_factory.mktemp("cross-site"),
        {"allowed_hosts": ALLOWED_HOSTS},
        env={**moto.environment(), "OPENMICROVM_ALLOWED_ORIGINS": ALLOWED_ORIGINS},
    ) as server:
        server.start()
        yield server


# ------------------------------------------------------------------ bodies a page sends unasked


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_a_cross_site_simple_post_creates_nothing(server: ServerProcess, content_type: str) -> None:
    name = _name()
    response = _create(server, name, {"Content-Type": content_type, "Origin": EVIL})
    _refused(response, 403, "AccessDeniedException", EVIL, "allowed_origins")
    assert not _cors_headers(response)
    assert not _exists(server, name)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "text/plain; charset=application/json", "application/jsonx", None]
)
def test_a_body_not_labelled_json_is_refused_whatever_its_origin(
    server: ServerProcess, content_type: str | None
) -> None:
    """No Origin needed: a label a page can send unasked is refused on its own (fetch with a Blob
    body sends no Content-Type at all; http.client adds none either)."""
    name = _name()
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = _create(server, name, headers)
    sent = "no Content-Type" if content_type is None else repr(content_type)
    _refused(response, 403, "AccessDeniedException", "application/json", sent)
    assert not _exists(server, name)


def test_a_chunked_body_not_labelled_json_is_refused(server: ServerProcess) -> None:
    name = _name()
    body = json.dumps(image_request(name)).encode()
    answer = exchange(
        server.port,
        b"POST " + IMAGES.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n",
    )
    assert answer.status == 403, answer.data
    assert b"AccessDeniedException" in answer.data
    assert not _exists(server, name)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_bodies_are_served(server: ServerProcess, content_type: str) -> None:
    name = _name()
    assert _create(server, name, {"Content-Type": content_type}).status == 201
    assert _exists(server, name)


def test_boto3_labels_every_body_it_sends_as_json(server: ServerProcess) -> None:
    """What boto3 (and the AWS CLI, the same botocore) sends for this service, captured on the way
    out: every body it sends is labelled application/json, and the server serves it."""
    client = server.client()
    sent: list[str] = []

    def capture(request: Any, **_: Any) -> None:
        if request.body:
            value = request.headers.get("Content-Type")
            sent.append(value.decode() if isinstance(value, bytes) else str(value))

    client.meta.events.register("before-send.lambda-microvms", capture)
    arn = client.create_microvm_image(**image_request(_name()))["imageArn"]
    client.tag_resource(Resource=arn, Tags={"team": "x"})
    assert client.list_tags(Resource=arn)["Tags"] == {"team": "x"}
    # Past the guard to the service, which finds no such MicroVM.
    code, _, _ = aws_error(
        client.create_microvm_auth_token,
        microvmIdentifier="microvm-none",
        expirationInMinutes=5,
        allowedPorts=[{"port": 8080}],
    )
    assert code == "ResourceNotFoundException"
    assert len(sent) == 3 and set(sent) == {"application/json"}, sent


# ------------------------------------------------------------------------------------- origins


def test_a_foreign_origin_is_refused_whatever_it_sends(server: ServerProcess) -> None:
    name = _name()
    # JSON as a page could send it after a preflight (which it never gets): still refused.
    json_post = _create(server, name, {"Content-Type": "application/json", "Origin": EVIL})
    _refused(json_post, 403, "AccessDeniedException", EVIL, "allowed_origins")
    assert not _exists(server, name)
    # A read whose answer a page could otherwise see (once rebinding or CORS let it).
    for origin in (EVIL, "null", f"http://127.0.0.1:{server.port + 1}", f"ftp://127.0.0.1:{server.port}"):
        read = raw_request(server.port, "GET", IMAGES, None, {"Origin": origin})
        _refused(read, 403, "AccessDeniedException", "allowed_origins")
        assert not _cors_headers(read)


def test_a_preflight_from_a_foreign_origin_gets_no_cors_headers(server: ServerProcess) -> None:
    response = raw_request(
        server.port,
        "OPTIONS",
        IMAGES,
        None,
        {
            "Origin": EVIL,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    _refused(response, 403, "AccessDeniedException", EVIL)
    assert not _cors_headers(response)


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_a_browser_request_from_another_site_without_origin_is_refused(
    server: ServerProcess, site: str
) -> None:
    """An <img> or <script> GET carries no Origin, but its Sec-Fetch-Site tells where it is from."""
    for path in (IMAGES, METRICS):
        response = raw_request(server.port, "GET", path, None, {"Sec-Fetch-Site": site})
        _refused(response, 403, "AccessDeniedException", "Sec-Fetch-Site", "allowed_origins")


def test_the_servers_own_origin_is_served(server: ServerProcess) -> None:
    """A page served by this server itself (a same-origin console) is no cross-site caller."""
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}"):
        name = _name()
        response = _create(
            server,
            name,
            {
                "Host": host,
                "Origin": f"http://{host}",
                "Content-Type": "application/json",
                "Sec-Fetch-Site": "same-origin",
            },
        )
        assert response.status == 201, response.body
        assert not _cors_headers(response)
        assert _exists(server, name)
    typed = raw_request(server.port, "GET", IMAGES, None, {"Sec-Fetch-Site": "none"})  # typed into the bar
    assert typed.status == 200


# --------------------------------------------------------------------------------------- hosts


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example:{port}",
        "attacker.example",
        "localhost.attacker.example",
        "127.0.0.1.nip.io:{port}",
        "[::2]:{port}",
        "0.0.0.0:{port}",
        "",
    ],
)
def test_a_host_that_does_not_name_this_server_is_misdirected(server: ServerProcess, host: str) -> None:
    """DNS rebinding: the page's own name, pointed at 127.0.0.1, is what its requests carry."""
    host = host.format(port=server.port)
    name = _name()
    created = _create(server, name, {"Host": host, "Content-Type": "application/json"})
    _refused(created, 421, "MisdirectedRequestException", repr(host), "allowed_hosts")
    assert not _exists(server, name)
    for method, path in [("GET", IMAGES), ("GET", METRICS), ("GET", LOGS), ("OPTIONS", IMAGES)]:
        response = raw_request(server.port, method, path, None, {"Host": host})
        _refused(response, 421, "MisdirectedRequestException", repr(host), "allowed_hosts")
        assert not _cors_headers(response)


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST:1", "localhost.", "127.0.0.1:{port}", "[::1]:4599", "[0:0:0:0:0:0:0:1]"]
)
def test_the_names_of_this_server_are_served(server: ServerProcess, host: str) -> None:
    response = raw_request(server.port, "GET", IMAGES, None, {"Host": host.format(port=server.port)})
    assert response.status == 200, response.body


def test_a_request_without_a_host_is_misdirected(server: ServerProcess) -> None:
    answer = exchange(server.port, f"GET {IMAGES} HTTP/1.0\r\n\r\n".encode())
    assert answer.status == 421, answer.data
    assert b"MisdirectedRequestException" in answer.data and b"no Host header" in answer.data


def test_an_absolute_form_target_must_name_this_server_too(server: ServerProcess) -> None:
    """HTTP lets the authority of `GET http://name/path` win over the Host header."""
    answer = exchange(
        server.port,
        f"GET http://attacker.example:{server.port}{IMAGES} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\nConnection: close\r\n\r\n".encode(),
    )
    assert answer.status == 421, answer.data
    assert b"attacker.example" in answer.body


def test_every_request_of_a_connection_is_checked(server: ServerProcess) -> None:
    """The first request of a connection decides where the connection goes; the ones after it on
    the same connection are checked all the same, and an endpoint's Host never reaches /metrics."""
    requests = [
        f"GET {IMAGES} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        f"GET {IMAGES} HTTP/1.1\r\nHost: attacker.example\r\n\r\n",
        f"GET {METRICS} HTTP/1.1\r\nHost: {ENDPOINT_HOST}:{server.port}\r\n\r\n",
        f"GET {IMAGES} HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: {EVIL}\r\nConnection: close\r\n\r\n",
    ]
    answer = exchange(server.port, "".join(requests).encode())
    assert answer.statuses == [200, 421, 421, 403], answer.data
    assert answer.data.count(b"MisdirectedRequestException") == 2
    assert b"names a MicroVM endpoint" in answer.data


# --------------------------------------------------------------------------- what settings allow


@pytest.mark.parametrize(
    "host", ["openmicrovm.lan:4599", "OpenMicroVM.LAN.", "build-box.example:{port}", "[fe80::1]:80"]
)
def test_allowed_hosts_are_served(configured: ServerProcess, host: str) -> None:
    response = raw_request(configured.port, "GET", IMAGES, None, {"Host": host.format(port=configured.port)})
    assert response.status == 200, response.body


def test_a_host_not_in_allowed_hosts_is_still_misdirected(configured: ServerProcess) -> None:
    response = raw_request(configured.port, "GET", IMAGES, None, {"Host": "other.lan"})
    _refused(response, 421, "MisdirectedRequestException", "'other.lan'", "openmicrovm.lan", "allowed_hosts")


def test_an_allowed_origin_gets_cors_answers(configured: ServerProcess) -> None:
    preflight = raw_request(
        configured.port,
        "OPTIONS",
        IMAGES,
        None,
        {
            "Origin": CONSOLE,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-amz-date,authorization",
        },
    )
    assert preflight.status == 204, preflight.body
    assert preflight.headers["access-control-allow-origin"] == CONSOLE
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed_headers = preflight.headers["access-control-allow-headers"].lower()
    assert all(name in allowed_headers for name in ("content-type", "x-amz-date", "authorization"))

    name = _name()
    created = _create(configured, name, {"Origin": CONSOLE, "Content-Type": "application/json"})
    assert created.status == 201, created.body
    assert created.headers["access-control-allow-origin"] == CONSOLE
    assert "x-amzn-requestid" in created.headers["access-control-expose-headers"].lower()
    assert _exists(configured, name)
    # The label rule holds for an allowed origin too; the page can read why.
    plain = _create(configured, _name(), {"Origin": CONSOLE, "Content-Type": "text/plain"})
    _refused(plain, 403, "AccessDeniedException", "application/json")
    assert plain.headers["access-control-allow-origin"] == CONSOLE
    # An origin is matched whatever case or default port the setting was written with.
    ops = raw_request(configured.port, "GET", IMAGES, None, {"Origin": "https://ops.example"})
    assert ops.status == 200 and ops.headers["access-control-allow-origin"] == "https://ops.example"


def test_origins_near_an_allowed_one_are_refused(configured: ServerProcess) -> None:
    for origin in ("http://console.example:9090", "https://console.example:8080", "http://console.example"):
        response = raw_request(configured.port, "GET", IMAGES, None, {"Origin": origin})
        _refused(response, 403, "AccessDeniedException", origin)
        assert not _cors_headers(response)


def test_the_own_origin_of_an_allowed_host_is_served(configured: ServerProcess) -> None:
    host = f"openmicrovm.lan:{configured.port}"
    for origin in (f"http://{host}", f"https://{host}"):
        response = raw_request(configured.port, "GET", IMAGES, None, {"Host": host, "Origin": origin})
        assert response.status == 200, response.body
        assert not _cors_headers(response)
