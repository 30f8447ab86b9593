"""What the web console costs (the console issue's closing figures): the MicroVM list's first paint
with many MicroVMs running, and the terminal's keystroke echo, each beside the same data fetched
or the same keystroke sent without a browser, in the same run.

    .venv/bin/python bench/bench_console.py [--count 200] [--loads 5] [--keys 30] [--json]

On one real server with the sample app (512 MiB per MicroVM, the image's resources), in this order:
  terminal   one MicroVM run with HTTP_INGRESS and SHELL_INGRESS. Baseline first: the shell's
             WebSocket straight from aiohttp, --keys single keystrokes, each timed from send to
             the frame that echoes it. Then headless Chromium (Debian's, with the console tests'
             launch flags) on #/microvms/<id>, "Open terminal", the same keystrokes typed into
             xterm.js, each timed in the page from its keydown to its echo in #terminal
             .xterm-rows, and to the rendering of the frame that shows it; split into keydown ->
             WebSocket send -> echo frame -> DOM.
  list       ramp to --count running MicroVMs (10 callers, as bench_scale does). Then --loads
             fresh loads of /console/#/microvms, a new browser context each: first contentful
             paint, when the table holds --count rows (in the DOM, and its frame rendered), and
             when every row on screen shows its endpoint (the page asks GetMicrovm for the rows on
             screen only). Baseline: boto3 ListMicrovms paging through all of them, and the same
             plus a GetMicrovm for as many MicroVMs as the page had rows on screen, 6 at a time.
             Also the server's CPU with the fleet idle and the load average, since the page's
             times depend on both.
Page times are read in the page (performance.now(), whose zero is the navigation's start), so
Playwright's own round trips to the browser are not counted. The machine is shared and noisy:
every figure is a median, and each baseline is measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.bench_endpoint import _cpu_seconds
from bench.bench_scale import Fleet
from bench.common import build_image, percentile
from tests.console.conftest import CHROMIUM, CHROMIUM_ARGS, VIEWPORT
from tests.support.images import SAMPLE_APP
from tests.support.server import ServerProcess

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CONNECTOR = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:{}"
LIST_ROWS = "table[aria-label=MicroVMs] tbody tr"
# The page fetches one GetMicrovm per listed MicroVM, this many at a time (views/microvms.js).
PAGE_DETAIL_FETCHES = 6
# Typed before the timed keys, so that the text to wait for is one that only our typing makes.
MARKER = ": "
KEYS = "abcdefghijklmnopqrstuvwxyz0123456789"
# Timed keys per line: the line is cleared (Ctrl-U) before it could wrap in an 80-column terminal.
KEYS_PER_LINE = 30
CTRL_U = "\x15"
WAIT_MS = 60_000

# Installed with add_init_script, which runs through the DevTools protocol before the page's own
# scripts: the console's Content-Security-Policy (script-src 'self') does not apply to it, and it
# sees the first mutation of the page. "Painted" is the first task after the rendering of the frame
# that shows a change: the DOM holding the rows is not yet pixels on screen. A change made outside
# a frame (the list, drawn when its fetch answers) is shown by the next frame; one made in a frame's
# requestAnimationFrame callbacks (xterm.js draws its rows there) by that frame itself, hence the
# wrapped requestAnimationFrame that says whether a frame is being rendered.
PAGE_PROBE = """
(() => {
  const afterTask = (done) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => done(performance.now());
    channel.port2.postMessage(0);
  };
  let inFrame = false;
  const requestFrame = window.requestAnimationFrame.bind(window);
  window.requestAnimationFrame = (callback) => requestFrame((time) => {
    if (!inFrame) {
      inFrame = true;
      afterTask(() => { inFrame = false; }); // after this frame's rendering
    }
    callback(time);
  });
  const afterPaint = (done) => (inFrame ? afterTask(done) : requestFrame(() => afterTask(done)));

  // The MicroVM list: when the table first holds `want` rows, and when every row on screen has its
  // endpoint (from the page's GetMicrovm of it) in place of the placeholder.
  const list = (window.__benchList = { want: -1, rows: null, rowsPainted: null, filled: null, filledPainted: null, visible: 0 });
  // The terminal: arm(expected, code) before a key; `done` resolves with [keydown, key sent on the
  // WebSocket, echo frame received, echo in the DOM, echo painted] once the rows' text contains
  // `expected` (null after 10 s).
  const keys = (window.__benchKeys = {
    expected: null, code: -1, down: null, sent: null, received: null, shown: null, done: null, resolve: null,
    arm(expected, code) {
      Object.assign(this, { expected, code, down: null, sent: null, received: null, shown: null });
      this.done = new Promise((resolve) => { this.resolve = resolve; });
      setTimeout(() => this.resolve(null), 10000);
    },
  });
  document.addEventListener("keydown", () => {
    if (keys.expected !== null && keys.down === null) keys.down = performance.now();
  }, true);
  // The page's WebSocket, seen from inside, to split the echo's time into the browser's part and
  // the network's: a send of the key, then the first binary frame holding it. The subclass adds a
  // listener before the page's own and changes nothing else.
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    if (keys.down !== null && keys.sent === null && typeof data !== "string") keys.sent = performance.now();
    return send.call(this, data);
  };
  window.WebSocket = class extends WebSocket {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (event) => {
        if (keys.sent === null || keys.received !== null || typeof event.data === "string") return;
        if (new Uint8Array(event.data).includes(keys.code)) keys.received = performance.now();
      });
    }
  };

  const checkList = () => {
    if (list.want < 0 || list.filledPainted !== null) return;
    const rows = document.querySelectorAll("table[aria-label=MicroVMs] tbody tr");
    if (rows.length !== list.want) return;
    const now = performance.now();
    if (list.rows === null) {
      list.rows = now;
      afterPaint((t) => { list.rowsPainted = t; });
    }
    // The page asks for a row's details once the row is on screen: "filled" is every row in the
    // viewport showing its endpoint.
    const onScreen = [...rows].filter((row) => {
      const box = row.getBoundingClientRect();
      return box.bottom > 0 && box.top < window.innerHeight;
    });
    if (list.filled === null && onScreen.every((row) => row.cells[3] && row.cells[3].textContent !== "\\u2026")) {
      list.visible = onScreen.length;
      list.filled = now;
      afterPaint((t) => { list.filledPainted = t; });
    }
  };
  const checkKeys = () => {
    if (keys.expected === null || keys.down === null || keys.shown !== null) return;
    const rows = document.querySelector("#terminal .xterm-rows");
    if (!rows || !rows.textContent.replace(/\\u00a0/g, " ").includes(keys.expected)) return;
    keys.shown = performance.now();
    const marks = [keys.down, keys.sent, keys.received, keys.shown];
    afterPaint((painted) => keys.resolve([...marks, painted]));
  };
  new MutationObserver(() => { checkList(); checkKeys(); })
    .observe(document, { childList: true, subtree: true, characterData: true });
})();
"""


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def median_ms(values: list[float]) -> float:
    return ms(statistics.median(values)) if values else float("nan")


def p95_ms(values: list[float]) -> float:
    return ms(percentile(values, 0.95)) if values else float("nan")


def new_page(browser: Browser, setup: str = "") -> Page:
    """A page in a fresh context (no cache, cookies or storage from an earlier load), the probe in."""
    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    context.set_default_timeout(WAIT_MS)
    context.add_init_script(PAGE_PROBE + setup)
    return context.new_page()


def in_page(page: Page, expression: str, argument: Any = None) -> Any:
    """page.evaluate of a function. It goes through the DevTools protocol (Runtime.callFunctionOn),
    which the page's CSP (script-src 'self', no 'unsafe-eval') does not govern: checked when this
    bench was written, so the measured pages keep their CSP (no bypass_csp)."""
    return page.evaluate(expression, argument)


# -- the MicroVM list ----------------------------------------------------------------------------


def list_all(client: Any) -> list[dict[str, Any]]:
    """ListMicrovms page after page, with the API's default page size, as the page's listAll does."""
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        page = client.list_microvms(**({"nextToken": token} if token else {}))
        items.extend(page.get("items", []))
        token = page.get("nextToken")
        if not token:
            return items


def list_baseline(server: ServerProcess, loads: int, visible: int) -> tuple[list[float], list[float]]:
    """Seconds for boto3 to list every MicroVM, and to list them and get the first `visible` (the
    rows a page shows on screen; 6 at a time), `loads` times each. The clients are made once, outside the timing: botocore loading its model is not
    the server's answer, and the page's wire model is part of what its load is timed with."""
    client = server.client(validate=False)
    fleet = Fleet(server, "")  # a boto3 client per thread
    list_all(client)  # the server's first answer after the ramp is not the one to time
    listed, filled = [], []
    with ThreadPoolExecutor(PAGE_DETAIL_FETCHES) as pool:
        list(pool.map(lambda _: fleet.client(), range(PAGE_DETAIL_FETCHES * 4)))
        for _ in range(loads):
            started = time.perf_counter()
            list_all(client)
            listed.append(time.perf_counter() - started)
            started = time.perf_counter()
            items = list_all(client)[:visible]
            list(
                pool.map(lambda item: fleet.client().get_microvm(microvmIdentifier=item["microvmId"]), items)
            )
            filled.append(time.perf_counter() - started)
    return listed, filled


def load_list(browser: Browser, server: ServerProcess, count: int) -> dict[str, Any]:
    """One fresh load of #/microvms; milliseconds since the navigation started."""
    # The probe must know how many rows to wait for before the page's first mutation.
    page = new_page(browser, f"window.__benchList.want = {count};")
    try:
        page.goto(f"{server.url}/console/#/microvms", wait_until="commit")
        deadline = time.monotonic() + WAIT_MS / 1000
        while True:
            marks = in_page(page, "() => window.__benchList")
            if marks["filledPainted"] is not None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the list did not show {count} filled rows in time: {marks}")
            time.sleep(0.05)
        # Where the time before the rows went, for the JSON: each request made before the table
        # held its rows, [path, start, end] in ms (the page's waterfall).
        timing = in_page(
            page,
            """(rows) => {
              const paint = Object.fromEntries(performance.getEntriesByType("paint").map((e) => [e.name, e.startTime]));
              const nav = performance.getEntriesByType("navigation")[0];
              const requests = performance.getEntriesByType("resource")
                .filter((e) => e.startTime < rows)
                .map((e) => [new URL(e.name).pathname.slice(0, 60), Math.round(e.startTime), Math.round(e.responseEnd)]);
              return { fcp: paint["first-contentful-paint"], dcl: nav.domContentLoadedEventEnd, requests };
            }""",
            marks["rows"],
        )
        return {
            key: round(value, 1) if isinstance(value, float) else value
            for key, value in {**marks, **timing}.items()
        }
    finally:
        page.context.close()


# -- the terminal ----------------------------------------------------------------------------------


async def shell_echo_baseline(
    server: ServerProcess, vm: dict[str, Any], token: str, keys: str
) -> list[float]:
    """The shell WebSocket straight from aiohttp (as `openmicrovm shell` opens it): seconds from
    sending each key to the binary frame that echoes it."""
    samples: list[float] = []
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"ws://127.0.0.1:{server.port}/shell?rows=24&cols=80",
            headers={"Host": f"{vm['endpoint']}:{server.port}"},
            protocols=(
                "lambda-microvms",
                f"lambda-microvms.authentication.{token}",
                "lambda-microvms.port.8022",
            ),
        ) as socket,
    ):

        async def until(text: str) -> None:
            seen = ""
            while text not in seen:
                message = await asyncio.wait_for(socket.receive(), WAIT_MS / 1000)
                if message.type == aiohttp.WSMsgType.BINARY:
                    seen += message.data.decode(errors="replace")
                elif message.type != aiohttp.WSMsgType.TEXT:  # TEXT: session_init, JSON control
                    raise RuntimeError(f"the shell WebSocket ended: {message}")

        await until("#")  # the prompt
        for start in range(0, len(keys), KEYS_PER_LINE):
            await socket.send_bytes(MARKER.encode())
            await until(MARKER)
            for key in keys[start : start + KEYS_PER_LINE]:
                await asyncio.sleep(0.05)  # as between the browser's keys
                started = time.perf_counter()
                await socket.send_bytes(key.encode())
                await until(key)
                samples.append(time.perf_counter() - started)
            await socket.send_bytes(CTRL_U.encode())  # clear the line
            await asyncio.sleep(0.2)
    return samples


def terminal_echo(
    browser: Browser, server: ServerProcess, vm: dict[str, Any], keys: str
) -> dict[str, list[float]]:
    """The same keys typed into the console's terminal, seconds for each: from keydown to its echo in
    the DOM (`shown`) and to the frame after it (`painted`); and the parts: keydown -> the key sent
    on the WebSocket (`to_socket`), sent -> the echo's frame received (`round_trip`, what the
    baseline times), received -> in the DOM (`to_dom`)."""
    page = new_page(browser)
    samples: dict[str, list[float]] = {
        "shown": [],
        "painted": [],
        "to_socket": [],
        "round_trip": [],
        "to_dom": [],
    }
    try:
        page.goto(f"{server.url}/console/#/microvms/{vm['microvmId']}")
        page.get_by_role("button", name="Open terminal").click()
        page.get_by_role("status").filter(has_text="open").wait_for()
        rows = page.locator("#terminal .xterm-rows > div")
        rows.filter(has_text="#").first.wait_for()  # the prompt
        for start in range(0, len(keys), KEYS_PER_LINE):
            typed = MARKER
            page.keyboard.type(MARKER)
            rows.filter(has_text=MARKER.strip()).first.wait_for()
            for key in keys[start : start + KEYS_PER_LINE]:
                typed += key
                time.sleep(0.05)  # let the previous key's frame pass: one key in flight at a time
                in_page(
                    page, "([expected, code]) => window.__benchKeys.arm(expected, code)", [typed, ord(key)]
                )
                page.keyboard.press(key)
                marks = in_page(page, "() => window.__benchKeys.done")
                if marks is None:
                    raise RuntimeError(f"no echo of {key!r} within 10 s (expected {typed!r})")
                down, sent, received, in_dom, frame = marks
                samples["shown"].append((in_dom - down) / 1000)
                samples["painted"].append((frame - down) / 1000)
                if sent is not None and received is not None:
                    samples["to_socket"].append((sent - down) / 1000)
                    samples["round_trip"].append((received - sent) / 1000)
                    samples["to_dom"].append((in_dom - received) / 1000)
            in_page(page, "() => { window.__benchKeys.expected = null; }")
            page.keyboard.press("Control+U")  # clear the line
            time.sleep(0.2)
    finally:
        page.context.close()
    return samples


def run_shell_microvm(server: ServerProcess, arn: str) -> dict[str, Any]:
    client = server.client(validate=False)
    vm = client.run_microvm(
        imageIdentifier=arn,
        ingressNetworkConnectors=[CONNECTOR.format("HTTP_INGRESS"), CONNECTOR.format("SHELL_INGRESS")],
    )
    deadline = time.monotonic() + 120
    while client.get_microvm(microvmIdentifier=vm["microvmId"])["state"] != "RUNNING":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{vm['microvmId']} not RUNNING within 120 s")
        time.sleep(0.05)
    return vm


# -- the run ---------------------------------------------------------------------------------------


def terminate_all(server: ServerProcess, callers: int) -> None:
    """Best effort, at the end: TerminateMicrovm of every MicroVM still there (the server's stop then
    runs `openmicrovm cleanup`, which ends whatever this missed)."""
    try:
        fleet = Fleet(server, "")
        ids = [
            item["microvmId"]
            for item in list_all(fleet.client())
            if item["state"] not in ("TERMINATED", "TERMINATING")
        ]
        with ThreadPoolExecutor(callers) as pool:
            list(pool.map(fleet.terminate, ids))
        fleet.wait_terminated(ids, timeout=600)
    except Exception as error:  # the run is over; cleanup below still ends the sandboxes
        print(f"  terminating at the end: {error}", file=sys.stderr)


Row = Callable[..., None]
DIRECT = "aiohttp WebSocket: send -> echo frame"


def terminal_phase(server: ServerProcess, browser: Browser, arn: str, keys: str, row: Row) -> None:
    vm = run_shell_microvm(server, arn)
    try:
        token = server.client(validate=False).create_microvm_shell_auth_token(
            microvmIdentifier=vm["microvmId"], expirationInMinutes=30
        )["authToken"]["X-aws-proxy-auth"]
        # Playwright's sync API keeps an event loop of its own on this thread: aiohttp runs one on
        # another thread.
        with ThreadPoolExecutor(1) as alone:
            direct = alone.submit(asyncio.run, shell_echo_baseline(server, vm, token, keys)).result()
        typed = terminal_echo(browser, server, vm, keys)
    finally:
        server.client(validate=False).terminate_microvm(microvmIdentifier=vm["microvmId"])
    row("terminal: keydown -> echo painted, p50 ms", median_ms(typed["painted"]), median_ms(direct), DIRECT)
    row("terminal: keydown -> echo painted, p95 ms", p95_ms(typed["painted"]), p95_ms(direct), DIRECT)
    row("terminal: keydown -> echo in the DOM, p50 ms", median_ms(typed["shown"]), median_ms(direct), DIRECT)
    # Where the page's time goes, medians of each part on its own (so they need not add up).
    row("  of which keydown -> key sent on the WebSocket", median_ms(typed["to_socket"]))
    row("  of which sent -> echo frame received", median_ms(typed["round_trip"]), median_ms(direct), DIRECT)
    row("  of which frame received -> echo in the DOM", median_ms(typed["to_dom"]))


def list_phase(server: ServerProcess, browser: Browser, arn: str, args: argparse.Namespace, row: Row) -> Any:
    started = time.perf_counter()
    Fleet(server, arn).ramp(args.count, args.callers)
    row(f"ramp to {args.count} running ({args.callers} callers), s", round(time.perf_counter() - started, 1))
    # What the server spends with the fleet idle, and what the machine is doing (it is shared): the
    # page's times below depend on both.
    assert server.process is not None
    cpu_before, wall_before = _cpu_seconds(server.process.pid), time.perf_counter()
    time.sleep(5)
    idle_cpu = (_cpu_seconds(server.process.pid) - cpu_before) / (time.perf_counter() - wall_before)
    row(f"server CPU, {args.count} running and no calls, % of a core", round(idle_cpu * 100, 1))
    row("machine load average (1 min) before the loads", round(os.getloadavg()[0], 1))
    loads = [load_list(browser, server, args.count) for _ in range(args.loads)]
    visible = round(statistics.median(load["visible"] for load in loads))
    listed, filled = list_baseline(server, args.loads, visible)
    for load in loads:
        # The end of the page's last ListMicrovms before its rows: the data is in the browser.
        load["listed"] = max(end for path, _, end in load["requests"] if path.endswith("/microvms"))

    def page_median(key: str) -> float:  # of the fresh loads' in-page times
        return round(statistics.median(load[key] for load in loads), 1)

    listing, note = median_ms(listed), f"boto3 ListMicrovms of all {args.count}"
    row("list page: first contentful paint (Loading...), ms", page_median("fcp"))
    row("list page: DOMContentLoaded, ms", page_median("dcl"))
    row("list page: its ListMicrovms answered, ms", page_median("listed"))
    row(
        f"list page: {args.count} rows drawn (answer -> in the DOM), ms",
        round(statistics.median(load["rows"] - load["listed"] for load in loads), 1),
    )
    row(f"list page: {args.count} rows in the DOM, ms", page_median("rows"), listing, note)
    row(f"list page: {args.count} rows painted, ms", page_median("rowsPainted"), listing, note)
    row(
        f"list page: the {visible} rows on screen with endpoints painted, ms",
        page_median("filledPainted"),
        median_ms(filled),
        f"boto3 List + {visible} Get, {PAGE_DETAIL_FETCHES} at a time",
    )
    return loads


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=200, help="running MicroVMs in the list")
    parser.add_argument("--loads", type=int, default=5, help="fresh loads of the list page")
    parser.add_argument("--keys", type=int, default=30, help="keystrokes timed in the terminal")
    parser.add_argument("--callers", type=int, default=10, help="threads that run the MicroVMs")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="make the scratch dir (server data dir, zips) in here (default: system temp)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM} is not installed (apt-get install -y --no-install-recommends chromium)")
    from playwright.sync_api import sync_playwright

    keys = (KEYS * (args.keys // len(KEYS) + 1))[: args.keys]
    report: dict[str, Any] = {}

    def row(name: str, value: float, baseline: float | None = None, note: str = "") -> None:
        ratio = round(value / baseline, 1) if baseline else None
        report[name] = {"value": value, "baseline": baseline, "ratio": ratio, "baseline_is": note}
        shown = f"{baseline} ({note})" if baseline is not None else note
        print(f"{name:55} {value!s:>8}   {shown:52} {'' if ratio is None else f'x{ratio}'}", flush=True)

    if args.data_dir:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="omv-console-", dir=args.data_dir))
    server = ServerProcess(scratch / "data", {"suspend_to_disk_after_seconds": 3600})
    try:
        server.start()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
            try:
                arn = build_image(server, "console-bench", SAMPLE_APP, scratch)
                print(f"{'figure':55} {'value':>8}   {'baseline, same run':52} ratio", flush=True)
                # The terminal first, on a quiet server: one MicroVM's latency, not the fleet's.
                terminal_phase(server, browser, arn, keys, row)
                report["list page loads, ms"] = list_phase(server, browser, arn, args, row)
            finally:
                browser.close()
    finally:
        terminate_all(server, args.callers)
        try:
            server.stop(timeout=600)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    print("(page times are read in the page, from the navigation's start; its CSP stays on)")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
