"""Inside the guest, as a user: RunMicrovm → the first 200 from the app through its endpoint,
beside `python3 app.py` → its first 200 on the same guest, each as the median of --runs.

Run with the checkout's venv python (boto3 is there), by guest_smoke's "first 200" step; prints
one JSON object. Figures only: nothing here passes or fails on a time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3

API_PORT = 4599
APP_PORT = 8080
SAMPLE_APP = Path(__file__).resolve().parents[2] / "examples" / "sample-app" / "app.py"


def first_200(port: int, host: str, token: str | None = None, timeout: float = 120.0) -> None:
    """GET / on 127.0.0.1:port with this Host header until it answers 200."""
    headers = {"Host": host, **({"X-aws-proxy-auth": token} if token else {})}
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
        time.sleep(0.005)
    raise SystemExit(f"no 200 from {host} within {timeout:g} s (last: {last!r})")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def baseline(runs: int) -> list[float]:
    """The sample app started as a plain process of the guest."""
    samples = []
    for _ in range(runs):
        port = free_port()
        started = time.perf_counter()
        process = subprocess.Popen(
            ["python3", str(SAMPLE_APP)], env={**os.environ, "PORT": str(port)}, stdout=subprocess.DEVNULL
        )
        try:
            first_200(port, f"127.0.0.1:{port}")
            samples.append(time.perf_counter() - started)
        finally:
            process.terminate()
            process.wait()
    return samples


def microvms(client: Any, image: str, runs: int, pause: float) -> list[float]:
    samples = []
    for _ in range(runs):
        time.sleep(pause)  # lets the warm pool refill, as between two users' requests
        started = time.perf_counter()
        microvm = client.run_microvm(imageIdentifier=image)
        token = client.create_microvm_auth_token(
            microvmIdentifier=microvm["microvmId"], expirationInMinutes=5, allowedPorts=[{"port": APP_PORT}]
        )["authToken"]["X-aws-proxy-auth"]
        first_200(API_PORT, f"{microvm['endpoint']}:{API_PORT}", token)
        samples.append(time.perf_counter() - started)
        client.terminate_microvm(microvmIdentifier=microvm["microvmId"])
    return samples


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("image", help="the image to run (name or ARN)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pause", type=float, default=10.0, help="seconds between two runs")
    args = parser.parse_args()
    client = boto3.client(
        "lambda-microvms",
        endpoint_url=f"http://127.0.0.1:{API_PORT}",
        region_name="us-east-1",
        aws_access_key_id="vm-smoke",
        aws_secret_access_key="vm-smoke",
    )
    ran = microvms(client, args.image, args.runs, args.pause)
    plain = baseline(args.runs)
    report = {
        "RunMicrovm -> first 200 (median ms)": median_ms(ran),
        "python3 app.py -> first 200 (median ms)": median_ms(plain),
        "ratio": round(statistics.median(ran) / statistics.median(plain), 2),
        "runs": args.runs,
        "all RunMicrovm ms": [round(value * 1000) for value in ran],
        "all python3 app.py ms": [round(value * 1000) for value in plain],
    }
    json.dump(report, sys.stdout)
    print()


if __name__ == "__main__":
    main()
