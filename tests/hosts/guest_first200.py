"""Inside the guest, as a user: RunMicrovm → the first 200 from the app through its endpoint,
beside `python3 app.py` → its first 200 on the same guest, each as the median of --runs.

Run with the checkout's venv python (boto3 is there), by guest_smoke's "first 200" step; prints
one JSON object. Figures only: nothing here passes or fails on a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: bench/, tests/
from bench.common import first_200, plain_app_first_200
from tests.support.endpoint import auth_token

API_PORT = 4599
# Under emulation a run or a plain start can take seconds; the benches' 30 s is too short.
FIRST_200_TIMEOUT = 120.0


def microvms(client: Any, image: str, runs: int, pause: float) -> list[float]:
    samples = []
    for _ in range(runs):
        time.sleep(pause)  # lets the warm pool refill, as between two users' requests
        started = time.perf_counter()
        microvm = client.run_microvm(imageIdentifier=image)
        token = auth_token(client, microvm["microvmId"], minutes=5)
        first_200(API_PORT, f"{microvm['endpoint']}:{API_PORT}", token, timeout=FIRST_200_TIMEOUT)
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
    plain = plain_app_first_200(args.runs, timeout=FIRST_200_TIMEOUT)
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
