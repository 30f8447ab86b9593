"""What the end-to-end benches share: a real server in a scratch dir, images built from local zips,
percentiles, and a minimal keep-alive HTTP/1.1 client that works over any asyncio stream."""

from __future__ import annotations

import asyncio
import http.client
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.images import (
    BUILD_ROLE,
    MANAGED_BASE,
    SAMPLE_APP,
    wait_image_settled,
    zip_dir,
)
from tests.support.server import ServerProcess, free_port


def build_image(server: ServerProcess, name: str, app_dir: Path, scratch: Path, **extra: Any) -> str:
    archive = scratch / f"{name}.zip"
    archive.write_bytes(zip_dir(app_dir))
    client = server.client(validate=False)
    arn = client.create_microvm_image(
        name=name,
        baseImageArn=MANAGED_BASE,
        buildRoleArn=BUILD_ROLE,
        codeArtifact={"uri": f"file://{archive}"},
        resources=[{"minimumMemoryInMiB": 512}],
        **extra,
    )["imageArn"]
    image = wait_image_settled(client, arn)
    if image["state"] != "CREATED":
        raise SystemExit(f"the {name} image did not build: {image}")
    return arn


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    """Milliseconds: median, p10, p90 of seconds measured."""
    return {
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p10_ms": round(percentile(values, 0.1) * 1000, 1),
        "p90_ms": round(percentile(values, 0.9) * 1000, 1),
        "n": len(values),
    }


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


async def http_get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, int]:
    """One request on a keep-alive connection; (status, body bytes). Understands Content-Length
    and chunked bodies, which is all the benchmark apps send."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, total
            remaining = size + 2
            while remaining:
                remaining -= len(await reader.read(min(remaining, 1 << 20)))
            total += size
    length = 0
    for line in lowered.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if length:
        await reader.readexactly(length)
    return status, length


def first_200(port: int, host: str, token: str | None = None, timeout: float = 30.0) -> None:
    """Poll GET / on 127.0.0.1:port with this Host (and endpoint token) until it answers 200."""
    headers = {"Host": host}
    if token:
        headers["X-aws-proxy-auth"] = token
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            connection.request("GET", "/", headers=headers)
            response = connection.getresponse()
            response.read()
            connection.close()
            if response.status == 200:
                return
            last = response.status
        except OSError as error:
            last = error
        time.sleep(0.002)
    raise RuntimeError(f"no 200 from {host} within {timeout:g} s (last: {last!r})")


def plain_app_first_200(runs: int, timeout: float = 30.0) -> list[float]:
    """The baseline every bench compares with: the sample app started as a plain process of this
    machine (`python3 app.py`), seconds from its start to its first 200, once per run."""
    samples = []
    for _ in range(runs):
        port = free_port()
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, str(SAMPLE_APP / "app.py")],
            env={**os.environ, "PORT": str(port)},
            stdout=subprocess.DEVNULL,
        )
        try:
            first_200(port, f"127.0.0.1:{port}", timeout=timeout)
            samples.append(time.perf_counter() - started)
        finally:
            process.terminate()
            process.wait()
    return samples


Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def load(open_connection: Opener, request: bytes, seconds: float, concurrency: int) -> dict[str, float]:
    """`concurrency` keep-alive clients sending `request` for `seconds`: requests/s, p50/p99 ms."""

    async def worker(latencies: list[float], deadline: float) -> None:
        reader, writer = await open_connection()
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                status, _ = await http_get(reader, writer, request)
                if status != 200:
                    raise RuntimeError(f"status {status}")
                latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    return await run_workers(worker, seconds, concurrency)


Worker = Callable[[list[float], float], Awaitable[None]]


async def run_workers(worker: Worker, seconds: float, concurrency: int) -> dict[str, float]:
    """`concurrency` copies of worker(latencies, deadline), each adding the latency of every
    request it makes until the deadline: requests, requests/s, p50/p99 ms."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    began = time.perf_counter()
    await asyncio.gather(*(worker(latencies, deadline) for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    return {
        "requests": len(latencies),
        "requests_per_second": round(len(latencies) / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
    }
