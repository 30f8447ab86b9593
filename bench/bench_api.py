"""Control-plane throughput: GetMicrovmImage and ListMicrovmImages (20 items) requests per second
through the real server, on SQLite and on PostgreSQL, beside the same client against a trivial
aiohttp "hello" handler in the same run.

    .venv/bin/python bench/bench_api.py [--databases sqlite,postgresql] [--seconds 3] [--rounds 5]
                                        [--concurrency 16]

A server per database runs beside the trivial handler, all of them for the whole run (idle while
another is measured); for PostgreSQL a private cluster (tests/support/postgres.py) is started and
the server given a fresh database of it. Each server first gets exactly 20 images (their builds
fail at once, which is what is listed), and the bench waits until no build is left before it
measures. The rounds interleave every target, so that the machine's noise falls on all of them
alike; figures are medians of the rounds.

The client keeps its connections alive and sends unsigned requests (the server maps them to the
default account), so what is measured is the server. Beside requests per second the table gives
the CPU time the server process (all its threads) spent per request, which the noise of a shared
machine moves less than throughput, and on PostgreSQL the CPU time its server processes spent per
request (on SQLite that is part of the server's own).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.server import ServerProcess, free_port

HELLO = """
from aiohttp import web
async def hello(request):
    return web.json_response({"hello": "world"})
app = web.Application()
app.router.add_route("*", "/{tail:.*}", hello)
web.run_app(app, host="127.0.0.1", port=%d, access_log=None, print=None)
"""
DATABASES = ("sqlite", "postgresql")
IMAGES = 20
ACCOUNT = "000000000000"
REGION = "us-east-1"
TRIVIAL = ("trivial aiohttp handler", "-")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    operation: str
    backend: str
    url: str
    pid: int
    # The processes of the database server (PostgreSQL's), whose CPU time a request also costs.
    database_pids: Callable[[], set[int]] = field(default=set)


@dataclass
class Sample:
    rate: float  # requests per second
    p50_ms: float
    cpu_us: float  # CPU time of the serving process (all its threads) per request, in microseconds
    database_cpu_us: float  # CPU time of the database server's processes per request


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, so far (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _cpu_of(pids: set[int]) -> dict[int, float]:
    return {pid: _cpu_seconds(pid) for pid in pids}


async def _throughput(url: str, seconds: float, concurrency: int) -> tuple[int, float, float]:
    """(requests done, elapsed seconds, p50 latency in ms) for GETs of one URL."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url} answered {response.status}")
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return len(latencies), elapsed, statistics.median(latencies) * 1000


def _measure(target: Target, seconds: float, concurrency: int) -> Sample:
    cpu_before = _cpu_seconds(target.pid)
    database_before = _cpu_of(target.database_pids())
    done, elapsed, p50 = asyncio.run(_throughput(target.url, seconds, concurrency))
    cpu = _cpu_seconds(target.pid) - cpu_before
    database_after = _cpu_of(target.database_pids())
    # A process that started meanwhile counts from 0; one that ended is left out.
    database = sum(used - database_before.get(pid, 0.0) for pid, used in database_after.items())
    return Sample(done / elapsed, p50, cpu / done * 1e6, database / done * 1e6)


def _wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextlib.contextmanager
def _trivial_handler() -> Iterator[Target]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", HELLO % port])
    try:
        _wait_listening(port)
        yield Target(*TRIVIAL, f"http://127.0.0.1:{port}/", process.pid)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _server(data_dir: Path, settings: dict[str, Any]) -> Iterator[ServerProcess]:
    server = ServerProcess(data_dir, settings)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _prepare(server: ServerProcess) -> None:
    """Exactly IMAGES images, with no build left running (they fail: the artifact does not exist)."""
    client = server.client(validate=False)
    for index in range(IMAGES):
        client.create_microvm_image(
            name=f"bench-{index}",
            baseImageArn=f"arn:aws:lambda:{REGION}:aws:microvm-image:al2023-1",
            buildRoleArn="arn:aws:iam::123456789012:role/bench",
            codeArtifact={"uri": "file:///nonexistent/app.zip"},
        )
    deadline = time.monotonic() + 60
    while True:
        page = client.list_microvm_images()
        busy = [item["name"] for item in page["items"] if item["state"] in ("CREATING", "UPDATING")]
        if not busy:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"builds still running after 60 s: {busy}")
        time.sleep(0.2)
    if len(page["items"]) != IMAGES or page.get("nextToken"):
        raise RuntimeError(f"expected one page of {IMAGES} images, got {len(page['items'])}")


def _targets(server: ServerProcess, backend: str, database_pids: Callable[[], set[int]]) -> list[Target]:
    assert server.process is not None
    arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:microvm-image:bench-0"
    api = f"{server.url}/2025-09-09/microvm-images"
    return [
        Target("GetMicrovmImage", backend, f"{api}/{arn}", server.process.pid, database_pids),
        Target(f"ListMicrovmImages ({IMAGES} items)", backend, api, server.process.pid, database_pids),
    ]


def _interrupt(signum: int, frame: Any) -> None:
    """The first Ctrl-C or SIGTERM unwinds the bench, leaving every context in order (servers, then
    the cluster, then the scratch directory); later ones are ignored, so as not to cut that short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("interrupted: stopping the servers and the cluster", file=sys.stderr, flush=True)
    raise KeyboardInterrupt


def _report(results: dict[tuple[str, str], list[Sample]]) -> None:
    baseline = statistics.median(sample.rate for sample in results[TRIVIAL])
    report = []
    print(
        f"{'operation':30} {'backend':10} {'req/s':>7} {'p50 ms':>7} {'vs trivial':>10} "
        f"{'server CPU µs/req':>17} {'database CPU µs/req':>19}"
    )
    for (operation, backend), samples in results.items():
        rate = statistics.median(sample.rate for sample in samples)
        p50 = statistics.median(sample.p50_ms for sample in samples)
        cpu = statistics.median(sample.cpu_us for sample in samples)
        database = statistics.median(sample.database_cpu_us for sample in samples)
        database_text = f"{database:19.0f}" if backend == "postgresql" else f"{'-':>19}"
        print(
            f"{operation:30} {backend:10} {rate:7.0f} {p50:7.2f} {rate / baseline:10.2f} {cpu:17.0f} "
            f"{database_text}"
        )
        report.append(
            {
                "operation": operation,
                "backend": backend,
                "requests_per_second": round(rate),
                "p50_ms": round(p50, 2),
                "ratio": round(rate / baseline, 2),
                "server_cpu_us_per_request": round(cpu),
                "database_cpu_us_per_request": round(database) if backend == "postgresql" else None,
                "rounds": [round(sample.rate) for sample in samples],
            }
        )
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--databases",
        default=",".join(DATABASES),
        help="comma-separated, of sqlite and postgresql (default both)",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per target and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    databases = [name.strip() for name in args.databases.split(",") if name.strip()]
    unknown = sorted(set(databases) - set(DATABASES))
    if unknown or not databases:
        parser.error(f"--databases takes {' and '.join(DATABASES)}, not {','.join(unknown) or 'nothing'}")

    # Also when started where SIGINT is ignored (a background job of a script).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="openmicrovm-bench-")))
        targets = [stack.enter_context(_trivial_handler())]
        for backend in databases:
            settings: dict[str, Any] = {}
            database_pids: Callable[[], set[int]] = set  # SQLite runs inside the server
            if backend == "postgresql":
                from tests.support.postgres import temporary_cluster

                cluster = stack.enter_context(temporary_cluster(keep_log_in=scratch))
                settings["database_url"] = cluster.create_database()
                database_pids = cluster.server_pids
            # Entered after the cluster, so left (stopped) before it.
            server = stack.enter_context(_server(scratch / backend, settings))
            _prepare(server)
            targets += _targets(server, backend, database_pids)
        results: dict[tuple[str, str], list[Sample]] = {(t.operation, t.backend): [] for t in targets}
        for target in targets:  # warm up: connections, caches, the first queries
            _measure(target, min(args.seconds, 1.0), args.concurrency)
        for round_number in range(args.rounds):
            # A different order each round, so that no target always follows the same one.
            shift = round_number % len(targets)
            for target in targets[shift:] + targets[:shift]:
                results[(target.operation, target.backend)].append(
                    _measure(target, args.seconds, args.concurrency)
                )
    _report(results)


if __name__ == "__main__":
    main()
