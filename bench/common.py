"""What the end-to-end benches share: a real server in a scratch dir, images built from local zips,
percentiles, and a minimal keep-alive HTTP/1.1 client that works over any asyncio stream."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.images import (
    BUILD_ROLE,
    MANAGED_BASE,
    wait_image_settled,
    zip_dir,
)
from tests.support.server import ServerProcess


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
