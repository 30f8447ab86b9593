"""Opening a MicroVM's endpoint in a browser tab, which cannot send an X-aws-proxy-auth header.

The console opens `<endpoint>/.openmicrovm/login?token=<endpoint token>` in a new tab. That request
is answered here, never by the app: the token is checked like any other, then set as a cookie of the
endpoint's own host (HttpOnly, SameSite=Strict, expiring with the token), and a page that moves on to
`/` at once, so that the token leaves the address bar and the history.

The cookie stands in for the header only on requests a browser says come from the endpoint's own
pages or from the user (Sec-Fetch-Site `same-origin` or `none`). Every MicroVM's endpoint is a
`*.localhost` host of one site, so a page served by another MicroVM's app is "same-site": it could
make the user's browser send requests to this endpoint, and SameSite=Strict alone would still
attach the cookie. Such requests (`same-site`, `cross-site`) get no credit from the cookie. Clients
that send no Sec-Fetch-Site (curl, SDKs) have no such cookie unless they set it themselves. The
cookie is removed from the request before the app sees it, as the X-aws-proxy-* headers are.
"""

from __future__ import annotations

import re
import urllib.parse

from openmicrovm.endpoint.http1 import Head

LOGIN_PATH = "/.openmicrovm/login"
COOKIE_NAME = "openmicrovm-endpoint-auth"
_TOKEN_CHARACTERS = re.compile(r"[A-Za-z0-9._~-]+")
# Where a browser says a request comes from, when the cookie may count for it.
_OWN_FETCH_SITES = ("same-origin", "none")


def login_token(head: Head) -> str | None:
    """The token of a login request (GET LOGIN_PATH?token=...), "" for one without a token, and
    None for any other request (it goes to the app)."""
    method, target, _ = head.start
    path, _, query = target.partition("?")
    if method != "GET" or path != LOGIN_PATH:
        return None
    tokens = urllib.parse.parse_qs(query).get("token", [])
    # Only a token's own characters: the value goes into a Set-Cookie header once it has passed.
    if len(tokens) != 1 or not _TOKEN_CHARACTERS.fullmatch(tokens[0]):
        return ""
    return tokens[0]


def login_page(token: str, lifetime_seconds: int, secure: bool) -> bytes:
    """The answer to a login that passed: the cookie, and a page that goes on to `/`."""
    attributes = f"Path=/; Max-Age={max(lifetime_seconds, 0)}; HttpOnly; SameSite=Strict"
    if secure:
        attributes += "; Secure"
    body = (
        b"<!doctype html><meta charset=utf-8>"
        b'<meta http-equiv="refresh" content="0;url=/">'
        b"<title>Opening the MicroVM endpoint</title>"
        b'<p>Signed in to this MicroVM endpoint; <a href="/">continue</a>.</p>'
    )
    lines = [
        "HTTP/1.1 200 OK",
        "Content-Type: text/html; charset=utf-8",
        f"Content-Length: {len(body)}",
        f"Set-Cookie: {COOKIE_NAME}={token}; {attributes}",
        # The token is in this page's URL: keep it out of caches and of any Referer.
        "Cache-Control: no-store",
        "Referrer-Policy: no-referrer",
        "Content-Security-Policy: default-src 'none'",
        "X-Frame-Options: DENY",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _cookie_pairs(value: str) -> list[tuple[str, str]]:
    pairs = []
    for piece in value.split(";"):
        name, equals, cookie = piece.strip().partition("=")
        if equals:
            pairs.append((name.strip(), cookie.strip()))
    return pairs


def cookie_token(head: Head) -> str | None:
    """The endpoint token in our cookie, when the browser says the request is the endpoint's own."""
    site = head.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in _OWN_FETCH_SITES:
        return None
    found = [
        cookie
        for value in head.get_all("cookie")
        for name, cookie in _cookie_pairs(value)
        if name == COOKIE_NAME
    ]
    return found[0] if len(found) == 1 else None


def strip_cookie(head: Head) -> None:
    """Take our cookie out of the Cookie headers; the app's own cookies stay as they were."""
    kept: list[tuple[str, str]] = []
    for name, value in head.headers:
        if name.lower() == "cookie" and any(n == COOKIE_NAME for n, _ in _cookie_pairs(value)):
            others = [f"{n}={c}" for n, c in _cookie_pairs(value) if n != COOKIE_NAME]
            if others:
                kept.append((name, "; ".join(others)))
            continue
        kept.append((name, value))
    head.headers = kept
