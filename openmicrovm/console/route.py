"""`/console/`: the console's static files, the slice of the wire model its API client needs, and
the pinned third-party assets fetched at install time (vendor.py).

The pages are served behind the same guard as the API (Host and Origin rules, api/guard.py). Every
answer forbids framing (clickjacking the buttons that terminate MicroVMs) and limits scripts to
this origin, so that text an app or a build prints, shown in a log view, can never run as code.
"""

from __future__ import annotations

import functools
import json
import mimetypes
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from openmicrovm.config import default_cache_dir
from openmicrovm.console import vendor
from openmicrovm.wire_model import API_VERSION, operations

STATIC_DIR = Path(__file__).parent / "static"
CONSOLE_PREFIX = "/console/"
# Where the pinned third-party assets appear, below CONSOLE_PREFIX.
VENDOR_PREFIX = "vendor/"
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".json": "application/json"}
# Scripts from this origin only; the terminal's WebSocket goes to a MicroVM's endpoint, a host of
# its own, hence ws:/wss: in connect-src. Inline styles are allowed because xterm.js styles its rows
# with <style> elements it writes at run time; the pages never turn text into markup, so no one
# else can add one.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files change with the checkout; a stale app.js beside a new page would misbehave.
    "Cache-Control": "no-cache",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _content_type(path: Path) -> str:
    return _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def static_files(root: Path = STATIC_DIR) -> dict[str, Path]:
    """Every servable file under root by its name relative to it, listed once: a request names a
    key of this map, never a path joined onto the directory."""
    return {
        path.relative_to(root).as_posix(): path
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


@functools.cache
def wire_slice() -> bytes:
    """What the browser's API client needs of the botocore model: each operation's method, URI
    template, status code and where each input member goes (uri, querystring, header, body)."""
    described: dict[str, object] = {}
    for operation in operations():
        members = operation.input_shape.members if operation.input_shape is not None else {}
        described[operation.name] = {
            "method": operation.http["method"],
            "uri": operation.http["requestUri"],
            "members": {
                name: [shape.serialization.get("location", "body"), shape.serialization.get("name", name)]
                for name, shape in members.items()
            },
        }
    return json.dumps({"apiVersion": API_VERSION, "operations": described}).encode()


def _file_response(path: Path) -> web.Response:
    return web.Response(
        body=path.read_bytes(), headers={**SECURITY_HEADERS, "Content-Type": _content_type(path)}
    )


def _not_found(name: str) -> web.Response:
    return web.Response(
        status=404,
        text=f"The console has no file {name!r}; start at {CONSOLE_PREFIX}",
        headers={**SECURITY_HEADERS, "Content-Type": "text/plain; charset=utf-8"},
    )


def add_console_routes(app: web.Application, cache_dir: Path) -> None:
    files = static_files()
    # install.sh runs vendor_install before a system service's settings name their own cache dir:
    # the assets may be in the default one, as the runsc it fetched is (runtime/runsc.py).
    cache_dirs = list(dict.fromkeys([cache_dir, default_cache_dir()]))

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound(CONSOLE_PREFIX)

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info["name"] or "index.html"
        if name == "model.json":
            return web.Response(
                body=wire_slice(), headers={**SECURITY_HEADERS, "Content-Type": _TYPES[".json"]}
            )
        if name.startswith(VENDOR_PREFIX):
            for directory in cache_dirs:
                served = vendor.served_file(directory, name[len(VENDOR_PREFIX) :])
                if served is not None:
                    return _file_response(served)
            return _not_found(name)
        path = files.get(name)
        return _file_response(path) if path is not None else _not_found(name)

    app.router.add_get(CONSOLE_PREFIX.rstrip("/"), redirect)
    app.router.add_get(CONSOLE_PREFIX + "{name:.*}", serve)
