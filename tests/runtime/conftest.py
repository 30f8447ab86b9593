"""Fixtures for the sandbox driver tests: real sandboxes from the cached Debian base rootfs.

Every test runs against each driver this machine can run (the others are skipped with the reason),
and every test must leave nothing behind: the `driver` fixture lists the driver's processes,
network namespaces, cgroups, mounts, runsc containers and state dirs after a passing test and
fails it if any is left, then sweeps whatever a failing test left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import textwrap
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from openmicrovm.config import default_cache_dir
from openmicrovm.runtime import cgroups, egress, make_driver, names, netns
from openmicrovm.runtime.base import BaseDriver
from openmicrovm.runtime.registry import missing_for
from tests.support.host import processes_naming

T = TypeVar("T")

APP_PORT = 8080

# The app every test runs: stdlib only, state in memory so restores can be told apart.
APP = textwrap.dedent(
    """
    import http.server, json, os, random, socket, sys, threading, time, urllib.parse

    TOKEN = random.randrange(10**12)  # made at start: equal in two sandboxes only via a snapshot
    count = 0
    HOOKS = "/aws/lambda-microvms/runtime/v1/"


    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, status, payload):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            global count
            url = urllib.parse.urlparse(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            if url.path == "/":
                count += 1
                self.reply(200, {"token": TOKEN, "count": count, "hostname": socket.gethostname(),
                                 "uid": os.getuid()})
            elif url.path == "/slow":
                time.sleep(float(query.get("seconds", "1")))
                self.reply(200, {"slept": float(query.get("seconds", "1"))})
            elif url.path == "/exit":
                self.reply(200, {"exiting": int(query["code"])})
                threading.Timer(0.2, os._exit, (int(query["code"]),)).start()
            elif url.path == "/print":
                print(query["text"], flush=True)
                self.reply(200, {"printed": query["text"]})
            elif url.path == "/write":
                with open(query["path"], "w") as handle:
                    handle.write(query["text"])
                self.reply(200, {"written": query["path"]})
            elif url.path == "/read":
                try:
                    with open(query["path"]) as handle:
                        self.reply(200, {"text": handle.read()})
                except OSError as error:
                    self.reply(404, {"error": str(error)})
            else:
                self.reply(404, {"error": "no such path"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            name = self.path[len(HOOKS):] if self.path.startswith(HOOKS) else None
            if name == "hang":
                time.sleep(3600)
            if name == "garbage":
                self.wfile.write(b"this is not HTTP\\r\\n\\r\\n")
                self.close_connection = True
                return
            self.reply(200 if name else 404, {"hook": name, "body": body.decode(), "host": self.headers["Host"],
                                              "content_type": self.headers.get("Content-Type")})

        def log_message(self, *args):
            pass


    http.server.ThreadingHTTPServer.request_queue_size = 256  # a flood is queued, not dropped
    host = os.environ.get("APP_HOST", "127.0.0.1")
    port = int(os.environ.get("APP_PORT", "8080"))
    print(f"app listening on {host}:{port}", flush=True)
    http.server.ThreadingHTTPServer((host, port), Handler).serve_forever()
    """
)

# Run inside a sandbox: try TCP connections and print what happened to each.
PROBE = textwrap.dedent(
    """
    import json, socket, sys
    results = {}
    for target in sys.argv[1:]:
        host, port = target.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=3).close()
            results[target] = "connected"
        except OSError as error:
            results[target] = f"{type(error).__name__} {error.errno}"
    print("PROBE " + json.dumps(results), flush=True)
    """
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="session", autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("sandbox drivers need root (namespaces, cgroups, mounts)")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return default_cache_dir()


def manifest(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under root with its mode, size and mtime: to prove nothing wrote to an image."""
    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            entries[os.path.relpath(path, root)] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return entries


_IMAGE_MANIFEST = pytest.StashKey[dict[str, tuple[int, int, int]]]()


@pytest.fixture(scope="session")
def app_rootfs(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Path]:
    """An image rootfs: the cached Debian base with the test app added.

    A copy of the 200 MB base takes seconds, so the image is a tree of hard links to the base's
    files (a fraction of a second) with /app added. Not an overlay mount: the process driver shows
    images owned by plain ids through an idmapped mount, and overlayfs cannot be idmapped.
    Sandboxes treat it as the read-only directory it is meant to be (and the tests check that
    nothing writes to it, which also keeps the shared base intact)."""
    from openmicrovm.builder.base_rootfs import ensure_base_rootfs

    try:
        base = ensure_base_rootfs(cache_dir)
    except Exception as error:  # no debootstrap, no mirror: nothing to test with
        pytest.skip(f"no base root filesystem: {error}")
    root = tmp_path_factory.mktemp("image") / "rootfs"
    subprocess.run(["cp", "-al", str(base), str(root)], check=True)
    try:
        (root / "app").mkdir(exist_ok=True)
        (root / "app" / "app.py").write_text(APP)
        (root / "app" / "probe.py").write_text(PROBE)
        request.session.stash[_IMAGE_MANIFEST] = manifest(root)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)  # unlinks the hard links; the base stays


@pytest.fixture(params=["gvisor", "process"])
def driver_name(request: pytest.FixtureRequest) -> str:
    problems = missing_for(request.param)
    if problems:
        pytest.skip(f"{request.param} driver unavailable: {'; '.join(problems)}")
    return str(request.param)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    if report.when == "call":
        item.stash[_PASSED] = report.passed
    return report


_PASSED = pytest.StashKey[bool]()


def leftovers(driver: BaseDriver) -> list[str]:
    """Everything of this driver's that is still on the host."""
    found: list[str] = []
    found += [f"netns {name}" for name in netns.list_names(names.netns_prefix(driver.scope))]
    parent = names.cgroup_parent(driver.scope)
    found += [f"cgroup {key}" for key in cgroups.children(driver.layout, parent)]
    found += [f"cgroup dir {path}" for path in cgroups.leftover_dirs(driver.layout, parent)]
    found += [f"state dir {path.name}" for path in driver.sandboxes_dir.iterdir()]
    for lease in egress.STATE_DIR.glob("*.lease"):
        with contextlib.suppress(OSError):
            if lease.read_text().startswith(names.netns_prefix(driver.scope)):
                found.append(f"uplink lease {lease.name}")
    marker = str(driver.state_root)
    found += [f"process {pid}: {cmdline[:120]}" for pid, cmdline in processes_naming(marker).items()]
    mountinfo = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line.split()[4]}" for line in mountinfo.splitlines() if marker in line]
    runsc_root = driver.state_root / "runsc"
    runsc = getattr(driver, "runsc", None)
    if runsc is not None and runsc_root.is_dir():
        listed = subprocess.run(
            [runsc.path, "--root", str(runsc_root), "list", "-quiet"], capture_output=True, text=True
        )
        found += [f"runsc container {name}" for name in listed.stdout.split()]
    return found


@pytest.fixture
def driver(
    request: pytest.FixtureRequest, driver_name: str, tmp_path: Path, cache_dir: Path
) -> Iterator[BaseDriver]:
    made = make_driver(driver_name, tmp_path / "state", cache_dir)
    assert isinstance(made, BaseDriver)
    yield made
    run(made.close())  # drops the warm pool; what is left now, the test itself left behind
    left = leftovers(made)
    run(made.cleanup_strays(set()))
    after_sweep = leftovers(made)
    assert not after_sweep, f"cleanup_strays could not remove: {after_sweep}"
    if request.node.stash.get(_PASSED, False):
        assert not left, f"the test left these behind: {left}"
        image = request.session.stash.get(_IMAGE_MANIFEST, None)
        if image is not None and "app_rootfs" in request.fixturenames:
            root = request.getfixturevalue("app_rootfs")
            now = manifest(root)
            changed = sorted(set(now.items()) ^ set(image.items()))
            assert not changed, f"the image root filesystem was written to: {changed[:10]}"
