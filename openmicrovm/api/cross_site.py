"""What a web page in the user's browser may send to the API.

With no access keys configured (the default) every request is accepted unsigned, so a page on
any site the user visits could drive the API unless the browser's own rules stop it. Those rules
only help when the browser has to ask first (a CORS preflight): it sends without asking a
"simple" request, a body of type text/plain, form-urlencoded or multipart (or of no type at all),
and it always labels a cross-origin request with an `Origin` header. So:

- a request body must be JSON (`application/json`, what boto3 and the AWS CLI send): a page can
  send that type only after a preflight, which is never answered for an origin not allowed;
- a request with an `Origin` is refused unless that origin is the server's own (a same-origin
  web console) or is listed in the `allowed_origins` setting;
- a request a browser marks as coming from another site (`Sec-Fetch-Site`) without an Origin (a
  plain cross-site GET such as an <img>) is refused too: no CORS caller sends one.

Origins in `allowed_origins` get CORS answers (preflights and Access-Control-Allow-Origin);
nobody else ever gets an Access-Control-Allow-* header.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from openmicrovm.config import Settings

JSON_MEDIA_TYPE = "application/json"
ACCESS_DENIED = "AccessDeniedException"
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}
# What an allowed origin may send: the methods of the API, and the headers AWS SDKs sign or add.
CORS_ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE"
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, X-Amz-Date, X-Amz-Content-Sha256, X-Amz-Security-Token, "
    "X-Amz-User-Agent, Amz-Sdk-Invocation-Id, Amz-Sdk-Request"
)
# Without these a page could not read the request id or the error code of an answer.
CORS_EXPOSE_HEADERS = "x-amzn-RequestId, X-Amzn-Errortype"
CORS_MAX_AGE_SECONDS = "600"


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str


class OriginKind(enum.Enum):
    NONE = "none"  # no Origin header: not a cross-origin browser request
    SAME = "same"  # the server's own origin
    ALLOWED = "allowed"  # listed in allowed_origins: gets CORS answers


def normalize_origin(origin: str) -> str:
    """`scheme://host[:port]` lowercased, without a trailing slash or the scheme's default port,
    so that a setting written `http://localhost:80/` matches what a browser sends."""
    origin = origin.strip().lower().rstrip("/")
    scheme = origin.partition("://")[0]
    default = _DEFAULT_PORTS.get(scheme)
    if default and origin.endswith(default):
        origin = origin[: -len(default)]
    return origin


def media_type(content_type: str) -> str:
    """The type/subtype of a Content-Type value, parameters (charset) left off."""
    return content_type.partition(";")[0].strip().lower()


class OriginPolicy:
    def __init__(self, settings: Settings) -> None:
        self.allowed = frozenset(normalize_origin(origin) for origin in settings.allowed_origins)

    def classify(self, origins: list[str], host: str, fetch_site: str | None) -> OriginKind | Refusal:
        """Where a request comes from, given its Origin headers, its (already allowed) Host and
        its Sec-Fetch-Site header; a Refusal for a web page this server does not serve."""
        if not origins:
            if fetch_site is not None and fetch_site.strip().lower() in ("cross-site", "same-site"):
                return Refusal(
                    ACCESS_DENIED,
                    f"A browser sent this request from another site (Sec-Fetch-Site: {fetch_site}) "
                    "without an Origin header; web pages may call this API only with CORS, from an "
                    "origin listed in the allowed_origins setting (OPENMICROVM_ALLOWED_ORIGINS).",
                )
            return OriginKind.NONE
        if len(origins) > 1:
            return Refusal(ACCESS_DENIED, "The request carries more than one Origin header.")
        origin = normalize_origin(origins[0])
        if origin in (normalize_origin(f"http://{host}"), normalize_origin(f"https://{host}")):
            return OriginKind.SAME
        if origin in self.allowed:
            return OriginKind.ALLOWED
        return Refusal(
            ACCESS_DENIED,
            f"Requests from the web origin {origins[0]!r} are refused: a web page may call this API "
            "only from an origin listed in the allowed_origins setting (environment "
            "OPENMICROVM_ALLOWED_ORIGINS, comma-separated). Add it there if that page should drive "
            "this server.",
        )


def check_body_type(has_body: bool, content_types: list[str]) -> Refusal | None:
    """A body must be labelled JSON: any other label, or none, is what a page can send cross-site
    without a preflight."""
    if not has_body:
        return None
    if len(content_types) == 1 and media_type(content_types[0]) == JSON_MEDIA_TYPE:
        return None
    if content_types:
        sent = "this one has Content-Type " + ", ".join(repr(value) for value in content_types)
    else:
        sent = "this one has no Content-Type"
    return Refusal(
        ACCESS_DENIED,
        f"A request body must be sent with Content-Type: {JSON_MEDIA_TYPE}; {sent}. A web page can "
        "send any other type (or none) to this server without the browser asking it first, so no "
        "setting allows them.",
    )


def is_preflight(method: str, request_method: str | None) -> bool:
    return method == "OPTIONS" and request_method is not None


def cors_headers(origin: str) -> dict[str, str]:
    """Headers of an answer to an allowed origin (never to any other)."""
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": CORS_EXPOSE_HEADERS,
        "Vary": "Origin",
    }


def preflight_headers(origin: str) -> dict[str, str]:
    return {
        **cors_headers(origin),
        "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
        "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
        "Access-Control-Max-Age": CORS_MAX_AGE_SECONDS,
    }
