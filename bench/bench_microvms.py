"""Running MicroVMs end to end through the real server (issue 5 figures), beside the same app as a
plain host process in the same run.

    .venv/bin/python bench/bench_microvms.py [--runs 20]

Prints, as medians (p10/p90) of --runs runs: RunMicrovm call → RUNNING; RunMicrovm → first 200
from the app through its endpoint; SuspendMicrovm → SUSPENDED; ResumeMicrovm → first 200; the RSS
of a running and of a suspended MicroVM; how many running MicroVMs of the sample app fit in this
machine's memory; and `python3 app.py` → first 200 as the baseline.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import build_image, summary
from tests.support.images import ALL_HOOKS, SAMPLE_APP
from tests.support.server import ServerProcess, free_port


def _first_200(port: int, host: str, token: str | None = None, timeout: float = 30.0) -> None:
    headers = {"Host": host}
    if token:
        headers["X-aws-proxy-auth"] = token
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            connection.request("GET", "/", headers=headers)
            response = connection.getresponse()
            response.read()
            connection.close()
            if response.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.002)
    raise RuntimeError("no 200 in time")


def _baseline(runs: int) -> list[float]:
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
            _first_200(port, f"127.0.0.1:{port}")
            samples.append(time.perf_counter() - started)
        finally:
            process.terminate()
            process.wait()
    return samples


def _wait_state(client: Any, microvm_id: str, state: str) -> None:
    while client.get_microvm(microvmIdentifier=microvm_id)["state"] != state:
        time.sleep(0.002)


def _rss_of(microvm_id: str) -> int:
    """Resident memory of every process that runs this MicroVM (sandbox, gofer, shim)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if microvm_id.encode() not in handle.read():
                    continue
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        server = ServerProcess(scratch / "data")
        server.start()
        try:
            arn = build_image(server, "sample", SAMPLE_APP, scratch, hooks=ALL_HOOKS)
            client = server.client(validate=False)
            to_running, to_first_200, to_suspended, to_resumed_200 = [], [], [], []
            rss_running, rss_suspended = [], []
            for _ in range(args.runs):
                started = time.perf_counter()
                vm = client.run_microvm(imageIdentifier=arn)
                _wait_state(client, vm["microvmId"], "RUNNING")
                to_running.append(time.perf_counter() - started)
                client.terminate_microvm(microvmIdentifier=vm["microvmId"])

                started = time.perf_counter()
                vm = client.run_microvm(imageIdentifier=arn)
                token = client.create_microvm_auth_token(
                    microvmIdentifier=vm["microvmId"], expirationInMinutes=5, allowedPorts=[{"port": 8080}]
                )["authToken"]["X-aws-proxy-auth"]
                host = f"{vm['endpoint']}:{server.port}"
                _first_200(server.port, host, token)  # held while PENDING, then served
                to_first_200.append(time.perf_counter() - started)
                rss_running.append(_rss_of(vm["microvmId"]))

                started = time.perf_counter()
                client.suspend_microvm(microvmIdentifier=vm["microvmId"])
                _wait_state(client, vm["microvmId"], "SUSPENDED")
                to_suspended.append(time.perf_counter() - started)
                rss_suspended.append(_rss_of(vm["microvmId"]))

                started = time.perf_counter()
                client.resume_microvm(microvmIdentifier=vm["microvmId"])
                _wait_state(client, vm["microvmId"], "RUNNING")
                _first_200(server.port, host, token)
                to_resumed_200.append(time.perf_counter() - started)
                client.terminate_microvm(microvmIdentifier=vm["microvmId"])
        finally:
            server.stop()
    baseline = _baseline(args.runs)
    rss = sorted(rss_running)[len(rss_running) // 2]
    with open("/proc/meminfo") as meminfo:
        total = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))
    report = {
        "RunMicrovm -> RUNNING": summary(to_running),
        "RunMicrovm -> first 200": summary(to_first_200),
        "SuspendMicrovm -> SUSPENDED": summary(to_suspended),
        "ResumeMicrovm -> first 200": summary(to_resumed_200),
        "baseline: python3 app.py -> first 200": summary(baseline),
        "RSS running MicroVM (MiB)": round(rss / 2**20, 1),
        "RSS suspended MicroVM (MiB)": round(sorted(rss_suspended)[len(rss_suspended) // 2] / 2**20, 1),
        "running MicroVMs that fit in this machine's memory": int(total // max(rss, 1)),
        "running MicroVMs that fit in 8 GiB": int(8 * 2**30 // max(rss, 1)),
    }
    for name, value in report.items():
        print(f"{name:55} {value}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
