"""Control-plane throughput: GetMicrovmImage and ListMicrovmImages requests per second through the
real server, beside the same client against a trivial aiohttp "hello" handler in the same run.

    .venv/bin/python bench/bench_api.py [--seconds 3] [--rounds 3] [--concurrency 16]

The client keeps its connections alive and sends unsigned requests (the server maps them to the
default account), so what is measured is the server. Figures are medians of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


async def _throughput(url: str, seconds: float, concurrency: int) -> tuple[float, float]:
    """(requests per second, p50 latency in ms) for GETs of one URL."""
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
    return len(latencies) / elapsed, statistics.median(latencies) * 1000


def _wait_listening(port: int) -> None:
    import socket

    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        server = ServerProcess(Path(scratch) / "data")
        server.start()
        hello_port = free_port()
        hello = subprocess.Popen([sys.executable, "-c", HELLO % hello_port])
        try:
            _wait_listening(hello_port)
            client = server.client(validate=False)
            for index in range(20):
                client.create_microvm_image(
                    name=f"bench-{index}",
                    baseImageArn="arn:aws:lambda:us-east-1:aws:microvm-image:al2023-1",
                    buildRoleArn="arn:aws:iam::123456789012:role/bench",
                    codeArtifact={"uri": "file:///nonexistent/app.zip"},
                )
            arn = "arn:aws:lambda:us-east-1:000000000000:microvm-image:bench-0"
            targets = {
                "GetMicrovmImage": f"{server.url}/2025-09-09/microvm-images/{arn}",
                "ListMicrovmImages (20 items)": f"{server.url}/2025-09-09/microvm-images",
                "trivial aiohttp handler": f"http://127.0.0.1:{hello_port}/",
            }
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, url in targets.items():
                    results[name].append(asyncio.run(_throughput(url, args.seconds, args.concurrency)))
        finally:
            hello.terminate()
            hello.wait()
            server.stop()

    baseline = statistics.median(r for r, _ in results["trivial aiohttp handler"])
    report = {}
    print(f"{'target':32} {'req/s':>9} {'p50 ms':>8} {'vs trivial':>10}")
    for name, samples in results.items():
        rate = statistics.median(r for r, _ in samples)
        p50 = statistics.median(p for _, p in samples)
        report[name] = {
            "requests_per_second": round(rate),
            "p50_ms": round(p50, 2),
            "ratio": round(rate / baseline, 2),
        }
        print(f"{name:32} {rate:9.0f} {p50:8.2f} {rate / baseline:10.2f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
