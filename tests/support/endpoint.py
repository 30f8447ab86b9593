"""Talking to a MicroVM through its endpoint on the real server, as a client of the data plane."""

from __future__ import annotations

import json
from typing import Any

from tests.support.http import RawResponse, raw_request
from tests.support.server import ServerProcess


def auth_token(
    client: Any, microvm_id: str, ports: list[dict[str, Any]] | None = None, minutes: int = 15
) -> str:
    response = client.create_microvm_auth_token(
        microvmIdentifier=microvm_id, expirationInMinutes=minutes, allowedPorts=ports or [{"port": 8080}]
    )
    return response["authToken"]["X-aws-proxy-auth"]


def call(
    server: ServerProcess,
    endpoint: str,
    token: str | None,
    path: str = "/",
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> RawResponse:
    sent = {"Host": f"{endpoint}:{server.port}", **(headers or {})}
    if token is not None:
        sent["X-aws-proxy-auth"] = token
    return raw_request(server.port, method, path, body, sent)


def app_state(server: ServerProcess, vm: dict[str, Any], token: str) -> dict[str, Any]:
    """GET / of the sample app: {"id", "counter", "microvmId", "payload", "hooks"}."""
    response = call(server, vm["endpoint"], token)
    assert response.status == 200, (response.status, response.body)
    return json.loads(response.body)
