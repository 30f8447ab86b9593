"""The endpoint's cost (issue 6 figures): the same client, in the same run, straight to the app
inside the sandbox (a connection made by the sandbox driver) and through the MicroVM's endpoint
on the server.

    .venv/bin/python bench/bench_endpoint.py [--seconds 3] [--concurrency 8] [--megabytes 200]

Prints requests per second and p50/p99 latency for a small response, the server's CPU time per
request, MB/s for a large body, and the first response from a SUSPENDED MicroVM with auto-resume.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.common import Opener, build_image, http_get, load, percentile
from tests.support.images import ALL_HOOKS, REPO, SAMPLE_APP
from tests.support.server import ServerProcess


async def _throughput(open_connection: Opener, request: bytes) -> float:
    reader, writer = await open_connection()
    try:
        started = time.perf_counter()
        _, size = await http_get(reader, writer, request)
        return size / (time.perf_counter() - started) / 1e6
    finally:
        writer.close()


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (/proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _request(path: str, host: str, token: str | None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
    if token:
        lines.append(f"X-aws-proxy-auth: {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _measure(
    server: ServerProcess, vm: dict[str, Any], token: str, args: argparse.Namespace
) -> dict[str, Any]:
    from openmicrovm.config import default_cache_dir
    from openmicrovm.runtime import make_driver

    # The server's own driver state, opened read-only from here: connections straight into the sandbox.
    driver = make_driver("auto", server.data_dir / "sandboxes", default_cache_dir())
    sandbox = await driver.adopt(vm["microvmId"])
    assert sandbox is not None

    async def direct() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await driver.connect(sandbox, 8080)

    async def endpoint() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", server.port, limit=1 << 20)

    host = f"{vm['endpoint']}:{server.port}"
    assert server.process is not None
    server_pid = server.process.pid
    results: dict[str, Any] = {}
    for name, opener, token_or_none in (("direct", direct, None), ("endpoint", endpoint, token)):
        small = _request("/headers", host, token_or_none)
        cpu_before = _cpu_seconds(server_pid)
        runs = [await load(opener, small, args.seconds, args.concurrency) for _ in range(3)]
        requests = sum(r["requests"] for r in runs)
        server_cpu_us = (_cpu_seconds(server_pid) - cpu_before) / requests * 1e6
        big = _request(f"/download?bytes={args.megabytes * 1024 * 1024}", host, token_or_none)
        rates = [await _throughput(opener, big) for _ in range(3)]
        results[name] = {
            "requests_per_second": statistics.median(r["requests_per_second"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "MB_per_second": round(statistics.median(rates), 1),
            # The server's own CPU (all its threads) per small request: the endpoint's cost
            # without the noise of a shared machine; about 0 when the server is not in the path.
            "server_cpu_us_per_request": round(server_cpu_us, 1),
        }
    results["endpoint / direct requests per second"] = round(
        results["endpoint"]["requests_per_second"] / results["direct"]["requests_per_second"], 2
    )
    results["added p50 ms"] = round(results["endpoint"]["p50_ms"] - results["direct"]["p50_ms"], 3)
    return results


def _auto_resume(server: ServerProcess, arn: str, rounds: int) -> list[float]:
    import http.client

    client = server.client(validate=False, client_side_validation=False)
    vm = client.run_microvm(
        imageIdentifier=arn,
        idlePolicy={
            "maxIdleDurationSeconds": 3600,
            "suspendedDurationSeconds": 3600,
            "autoResumeEnabled": True,
        },
    )
    token = client.create_microvm_auth_token(
        microvmIdentifier=vm["microvmId"], expirationInMinutes=30, allowedPorts=[{"port": 8080}]
    )["authToken"]["X-aws-proxy-auth"]
    samples = []
    try:
        for _ in range(rounds):
            while client.get_microvm(microvmIdentifier=vm["microvmId"])["state"] != "RUNNING":
                time.sleep(0.01)
            client.suspend_microvm(microvmIdentifier=vm["microvmId"])
            while client.get_microvm(microvmIdentifier=vm["microvmId"])["state"] != "SUSPENDED":
                time.sleep(0.01)
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            started = time.perf_counter()
            connection.request("GET", "/", headers={"Host": vm["endpoint"], "X-aws-proxy-auth": token})
            response = connection.getresponse()
            response.read()
            samples.append(time.perf_counter() - started)
            assert response.status == 200, response.status
            connection.close()
    finally:
        client.terminate_microvm(microvmIdentifier=vm["microvmId"])
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--resume-rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        server = ServerProcess(scratch / "data")
        server.start()
        try:
            echo = build_image(server, "echo", REPO / "tests" / "apps" / "echo", scratch)
            sample = build_image(server, "sample", SAMPLE_APP, scratch, hooks=ALL_HOOKS)
            client = server.client(validate=False)
            vm = client.run_microvm(imageIdentifier=echo)
            while client.get_microvm(microvmIdentifier=vm["microvmId"])["state"] != "RUNNING":
                time.sleep(0.01)
            token = client.create_microvm_auth_token(
                microvmIdentifier=vm["microvmId"], expirationInMinutes=30, allowedPorts=[{"port": 8080}]
            )["authToken"]["X-aws-proxy-auth"]
            results = asyncio.run(_measure(server, vm, token, args))
            resumes = _auto_resume(server, sample, args.resume_rounds)
            results["auto-resume first response"] = {
                "p50_ms": round(statistics.median(resumes) * 1000, 1),
                "p90_ms": round(percentile(resumes, 0.9) * 1000, 1),
                "n": len(resumes),
            }
            client.terminate_microvm(microvmIdentifier=vm["microvmId"])
        finally:
            server.stop()
    for name, value in results.items():
        print(f"{name:42} {value}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
