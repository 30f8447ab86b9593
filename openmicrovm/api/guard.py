"""The aiohttp middleware that keeps web pages away from everything the aiohttp app serves (the
API, /metrics, the logs route): a Host that does not name this server is answered 421
(hosts.py), a browser request this server does not serve is answered 403 (cross_site.py), both
in the AWS error form, before any handler runs.

MicroVM endpoint Hosts pass through to the routes that serve endpoints (the shell WebSocket),
which authenticate with tokens of their own; they never reach the API's routes.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Collection

from aiohttp import web

from openmicrovm.api.cross_site import (
    OriginKind,
    OriginPolicy,
    Refusal,
    check_body_type,
    cors_headers,
    is_preflight,
    preflight_headers,
)
from openmicrovm.api.hosts import HostPolicy
from openmicrovm.api.protocol import error_response
from openmicrovm.config import Settings

MISDIRECTED = "MisdirectedRequestException"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def _refuse(refusal: Refusal) -> web.Response:
    status, headers, body = error_response(refusal.code, refusal.message)
    headers["x-amzn-RequestId"] = str(uuid.uuid4())
    return web.Response(status=status, headers=headers, body=body)


def _check_host(policy: HostPolicy, request: web.Request) -> Refusal | None:
    hosts = request.headers.getall("Host", [])
    if not hosts:
        return Refusal(
            MISDIRECTED,
            "The request has no Host header, so it cannot say it is meant for this server; send "
            f"one of {policy.describe()} (or a name in the allowed_hosts setting).",
        )
    # request.host is the authority of an absolute-form target (`GET http://name/ HTTP/1.1`)
    # when there is one, which HTTP says wins over the header: both must name this server.
    for host in dict.fromkeys((hosts[0], request.host)):
        if not policy.allows(host):
            return Refusal(
                MISDIRECTED,
                f"This server does not answer to Host {host!r}: it serves its API only for "
                f"{policy.describe()} (any port). If that name is this server's, add it to the "
                "allowed_hosts setting (environment OPENMICROVM_ALLOWED_HOSTS, comma-separated).",
            )
    return None


def request_guard(
    settings: Settings,
    endpoint_host: Callable[[str | None], str | None],
    endpoint_routes: Collection[str],
) -> Middleware:
    """The middleware. endpoint_host tells a MicroVM endpoint's Host (its name, or None);
    endpoint_routes are the names of the routes that serve those Hosts."""
    hosts = HostPolicy(settings)
    origins = OriginPolicy(settings)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if endpoint_host(host) is not None:
            if request.match_info.route.name in endpoint_routes:
                return await handler(request)
            return _refuse(
                Refusal(
                    MISDIRECTED,
                    f"Host {host!r} names a MicroVM endpoint; {request.path} is served only on the "
                    "API's own host.",
                )
            )
        refusal = _check_host(hosts, request)
        if refusal is not None:
            return _refuse(refusal)
        assert host is not None  # _check_host refuses a request without one
        origin_headers = request.headers.getall("Origin", [])
        kind = origins.classify(origin_headers, host, request.headers.get("Sec-Fetch-Site"))
        if isinstance(kind, Refusal):
            return _refuse(kind)
        origin = origin_headers[0] if kind is OriginKind.ALLOWED else None
        if origin is not None and is_preflight(
            request.method, request.headers.get("Access-Control-Request-Method")
        ):
            return web.Response(status=204, headers=preflight_headers(origin))
        refusal = check_body_type(request.body_exists, request.headers.getall("Content-Type", []))
        if refusal is not None:
            response: web.StreamResponse = _refuse(refusal)
        else:
            response = await handler(request)
        if origin is not None and not response.prepared:
            response.headers.update(cors_headers(origin))
        return response

    return guard
