"""Fixtures for testing the web console in a real browser: Debian's Chromium driven by Playwright.

`browser` (per module) is one headless Chromium; `page` (per test) is a fresh context and page in it,
which leaves a screenshot and the page's console messages in the output dir when its test fails;
`save_screenshot(page, name)` writes a PNG there on purpose. `static_server` serves the console's
static files alone, for tests of its JS libraries without an openmicrovm server.

Output dir: $OPENMICROVM_TEST_OUTPUT/console/, or test-output/console/ at the repository root."""

from __future__ import annotations

import functools
import http.server
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page

REPO = Path(__file__).resolve().parents[2]
STATIC_DIR = REPO / "openmicrovm" / "console" / "static"
CHROMIUM = Path("/usr/bin/chromium")
# The machine reaches nothing but package registries: without these Chromium keeps trying to talk
# to Google (updates, sync, QUIC probes) and its first-run and GPU setup slow every launch.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}
DEFAULT_TIMEOUT_MS = 15_000
# Served by static_server next to the static files: an empty page of the same origin, from which
# a test can import the console's modules without running the console itself.
BLANK_PAGE = "/__blank__.html"


def output_dir() -> Path:
    """Where this run's console artifacts go (made on demand)."""
    base = os.environ.get("OPENMICROVM_TEST_OUTPUT")
    directory = (Path(base) if base else REPO / "test-output") / "console"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _file_stem(name: str) -> str:
    # Test ids hold "/", "::" and brackets; keep file names portable and readable.
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:180] or "page"


def save_screenshot(page: Page, name: str) -> Path:
    """Screenshot of the whole page as <output dir>/<name>.png; returns the path."""
    path = output_dir() / f"{_file_stem(name)}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _unavailable(reason: str) -> None:
    # A developer's machine may lack a browser; CI must have one, so there a missing browser is a
    # failure rather than a quietly skipped suite.
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: the console tests must run in CI)", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Keeps each phase's report on the test item, so that the page fixture's teardown can tell
    # whether its test failed.
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"console_report_{report.when}", report)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium (/usr/bin/chromium) per test module. Not per session: while started,
    Playwright's sync API keeps its event loop running in this thread, and every later test's
    asyncio.run() would fail with "cannot be called from a running event loop"."""
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is not installed (apt-get install -y --no-install-recommends chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e .[dev])")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A page in a fresh browser context (no cookies or storage from other tests), 1280x800, every
    wait bounded at 15 s. If the test fails, its screenshot and the page's console messages and
    uncaught errors are saved in the output dir as <test id>.png and <test id>.console.txt."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    # expect() has its own default (5 s); give assertions the same budget as actions.
    expect.set_options(timeout=DEFAULT_TIMEOUT_MS)
    new_page = context.new_page()
    messages: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        location = message.location or {}
        url = location.get("url")
        where = f" ({url}:{location.get('lineNumber', '')})" if url else ""
        messages.append(f"[{message.type}] {message.text}{where}")

    new_page.on("console", on_console)
    new_page.on("pageerror", lambda error: messages.append(f"[pageerror] {error}"))
    try:
        yield new_page
    finally:
        call_report: Any = getattr(request.node, "console_report_call", None)
        if call_report is not None and call_report.failed:
            stem = _file_stem(request.node.nodeid)
            try:
                save_screenshot(new_page, stem)
            except Exception as error:  # the page may be what broke; keep its messages anyway
                messages.append(f"[fixture] no screenshot: {error}")
            (output_dir() / f"{stem}.console.txt").write_text("\n".join(messages) + "\n", encoding="utf-8")
        context.close()


class _StaticHandler(http.server.SimpleHTTPRequestHandler):
    # Module scripts are refused unless served with a JavaScript MIME type, and mimetypes' answer
    # depends on the host's /etc/mime.types; state it.
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".css": "text/css",
        ".html": "text/html",
        ".svg": "image/svg+xml",
        ".json": "application/json",
    }

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == BLANK_PAGE:
            # The icon link keeps Chromium from asking for /favicon.ico and logging the 404.
            body = b"<!doctype html><meta charset=utf-8><link rel=icon href=data:,><title>blank</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def end_headers(self) -> None:
        # A test edits a library and reruns: never let the browser answer from its cache.
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would bury pytest's output


@pytest.fixture(scope="session")
def static_server() -> Iterator[str]:
    """Base URL (http://127.0.0.1:<port>, no trailing slash) of a server for
    openmicrovm/console/static/ alone; <base>/__blank__.html is an empty page to import modules
    from, e.g. page.goto(static_server + "/__blank__.html") then
    page.evaluate("import('/lib/sha256.js').then(...)")."""
    handler = functools.partial(_StaticHandler, directory=str(STATIC_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="console-static-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
