"""A browser tab on a MicroVM's endpoint (browser_login.py): the login path sets the token as a
cookie of the endpoint's host; the cookie counts only for the endpoint's own pages, never for a
page of another MicroVM (same site) or another site, and the app never sees it."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import pytest

from openmicrovm.endpoint.browser_login import COOKIE_NAME, LOGIN_PATH
from tests.endpoint.conftest import HTTP, SHELL, run_microvm
from tests.support.endpoint import auth_token, call
from tests.support.http import RawResponse
from tests.support.server import ServerProcess


def login(server: ServerProcess, vm: dict[str, Any], token: str) -> RawResponse:
    return call(server, vm["endpoint"], None, f"{LOGIN_PATH}?token={urllib.parse.quote(token)}")


def with_cookie(
    server: ServerProcess, vm: dict[str, Any], token: str, site: str | None, path: str = "/headers"
) -> RawResponse:
    headers = {"Cookie": f"theme=dark; {COOKIE_NAME}={token}; lang=en"}
    if site is not None:
        headers["Sec-Fetch-Site"] = site
    return call(server, vm["endpoint"], None, path, headers=headers)


def test_the_login_sets_a_strict_cookie_and_moves_on(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"], minutes=2)
    answer = login(endpoint_server, echo_vm, token)
    assert answer.status == 200
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}={token};")
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="):
        assert attribute in cookie
    lifetime = int(cookie.split("Max-Age=")[1].split(";")[0])
    assert 0 < lifetime <= 2 * 2  # the test server's "minute" lasts 2 s
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert b'http-equiv="refresh" content="0;url=/"' in answer.body


@pytest.mark.parametrize("token", ["", "not-a-token", "a b", "x\r\nSet-Cookie: planted=1"])
def test_a_login_without_a_valid_token_is_refused(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any], token: str
) -> None:
    answer = login(endpoint_server, echo_vm, token)
    assert answer.status == 403
    assert "set-cookie" not in answer.headers


def test_the_cookie_counts_for_the_endpoints_own_pages_only(
    endpoint_server: ServerProcess, echo_vm: dict[str, Any]
) -> None:
    token = auth_token(endpoint_server.client(), echo_vm["microvmId"])
    for site in ("same-origin", "none", None):
        answer = with_cookie(endpoint_server, echo_vm, token, site)
        assert answer.status == 200, (site, answer.body)
        seen = {name.lower(): value for name, value in json.loads(answer.body)["headers"]}
        # The app keeps its own cookies and never sees the token.
        assert seen["cookie"] == "theme=dark; lang=en"
        assert token not in answer.body.decode()
    # Another MicroVM's page (every endpoint is a *.localhost host of one site) or another site.
    for site in ("same-site", "cross-site"):
        assert with_cookie(endpoint_server, echo_vm, token, site).status == 403, site


def test_a_cookie_of_another_microvm_or_kind_does_not_open_this_one(
    endpoint_server: ServerProcess, echo_image: str, echo_vm: dict[str, Any]
) -> None:
    other = run_microvm(endpoint_server, echo_image, ingressNetworkConnectors=[HTTP])
    try:
        foreign = auth_token(endpoint_server.client(), other["microvmId"])
        assert with_cookie(endpoint_server, echo_vm, foreign, "same-origin").status == 403
        assert login(endpoint_server, echo_vm, foreign).status == 403
        shell = endpoint_server.client().create_microvm_shell_auth_token(
            microvmIdentifier=echo_vm["microvmId"], expirationInMinutes=1
        )["authToken"]["X-aws-proxy-auth"]
        assert login(endpoint_server, echo_vm, shell).status == 403
    finally:
        endpoint_server.client().terminate_microvm(microvmIdentifier=other["microvmId"])


def test_no_login_for_a_microvm_without_http_ingress(endpoint_server: ServerProcess, echo_image: str) -> None:
    shell_only = run_microvm(endpoint_server, echo_image, ingressNetworkConnectors=[SHELL])
    try:
        token = auth_token(endpoint_server.client(), shell_only["microvmId"])
        answer = login(endpoint_server, shell_only, token)
        assert answer.status == 403 and "set-cookie" not in answer.headers
    finally:
        endpoint_server.client().terminate_microvm(microvmIdentifier=shell_only["microvmId"])
