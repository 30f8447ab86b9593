"""Running MicroVMs end to end through the real server (issue 5 figures), beside the same app as a
plain host process in the same run.

    .venv/bin/python bench/bench_microvms.py [--runs 20]

Prints, as medians (p10/p90) of --runs runs: RunMicrovm call → RUNNING; RunMicrovm → first 200
from the app through its endpoint, with a warm restore pool and with the pool just used;
SuspendMicrovm → SUSPENDED; ResumeMicrovm → first 200 while the memory is still frozen in RAM and
after it went to disk; the RSS of a running, a frozen and a suspended-to-disk MicroVM; how many
running MicroVMs of the sample app fit in this machine's memory; and `python3 app.py` → first
200 as the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.common import build_image, first_200, plain_app_first_200, summary
from tests.support.endpoint import auth_token
from tests.support.images import ALL_HOOKS, SAMPLE_APP
from tests.support.server import ServerProcess


def _wait_state(client: Any, microvm_id: str, state: str) -> None:
    while client.get_microvm(microvmIdentifier=microvm_id)["state"] != state:
        time.sleep(0.002)


def _rss_of(server: ServerProcess, microvm_id: str) -> int:
    """The memory charged to a MicroVM's sandbox, as the server's /metrics reports it."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "openmicrovm_sandbox_rss_bytes":
            for sample in family.samples:
                if sample.labels.get("microvm_id") == microvm_id:
                    return int(sample.value)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--refill-seconds", type=float, default=1.5, help="pause that lets the warm pool refill"
    )
    args = parser.parse_args()
    samples: dict[str, list[float]] = {
        "RunMicrovm -> RUNNING (warm pool)": [],
        "RunMicrovm -> first 200 (warm pool)": [],
        "RunMicrovm -> first 200 (pool empty: back-to-back run)": [],
        "SuspendMicrovm -> SUSPENDED": [],
        "ResumeMicrovm -> first 200 (suspended < suspend_to_disk_after)": [],
        "ResumeMicrovm -> first 200 (from disk)": [],
    }
    rss_running, rss_frozen, rss_on_disk = [], [], []
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        server = ServerProcess(scratch / "data", {"suspend_to_disk_after_seconds": 2})
        server.start()
        try:
            arn = build_image(server, "sample", SAMPLE_APP, scratch, hooks=ALL_HOOKS)
            client = server.client(validate=False)
            for _ in range(args.runs):
                time.sleep(args.refill_seconds)
                started = time.perf_counter()
                vm = client.run_microvm(imageIdentifier=arn)
                _wait_state(client, vm["microvmId"], "RUNNING")
                samples["RunMicrovm -> RUNNING (warm pool)"].append(time.perf_counter() - started)
                client.terminate_microvm(microvmIdentifier=vm["microvmId"])

                time.sleep(args.refill_seconds)
                started = time.perf_counter()
                vm = client.run_microvm(imageIdentifier=arn)
                token = auth_token(client, vm["microvmId"], minutes=5)
                host = f"{vm['endpoint']}:{server.port}"
                first_200(server.port, host, token)  # held while PENDING, then served
                samples["RunMicrovm -> first 200 (warm pool)"].append(time.perf_counter() - started)
                rss_running.append(_rss_of(server, vm["microvmId"]))

                started = time.perf_counter()
                second = client.run_microvm(imageIdentifier=arn)  # the pool was just used
                first_200(
                    server.port,
                    f"{second['endpoint']}:{server.port}",
                    auth_token(client, second["microvmId"], minutes=5),
                )
                samples["RunMicrovm -> first 200 (pool empty: back-to-back run)"].append(
                    time.perf_counter() - started
                )
                client.terminate_microvm(microvmIdentifier=second["microvmId"])

                started = time.perf_counter()
                client.suspend_microvm(microvmIdentifier=vm["microvmId"])
                _wait_state(client, vm["microvmId"], "SUSPENDED")
                samples["SuspendMicrovm -> SUSPENDED"].append(time.perf_counter() - started)
                rss_frozen.append(_rss_of(server, vm["microvmId"]))
                started = time.perf_counter()
                client.resume_microvm(microvmIdentifier=vm["microvmId"])
                _wait_state(client, vm["microvmId"], "RUNNING")
                first_200(server.port, host, token)
                samples["ResumeMicrovm -> first 200 (suspended < suspend_to_disk_after)"].append(
                    time.perf_counter() - started
                )

                client.suspend_microvm(microvmIdentifier=vm["microvmId"])
                _wait_state(client, vm["microvmId"], "SUSPENDED")
                time.sleep(3.0)  # past suspend_to_disk_after: the memory is on disk
                rss_on_disk.append(_rss_of(server, vm["microvmId"]))
                started = time.perf_counter()
                client.resume_microvm(microvmIdentifier=vm["microvmId"])
                _wait_state(client, vm["microvmId"], "RUNNING")
                first_200(server.port, host, token)
                samples["ResumeMicrovm -> first 200 (from disk)"].append(time.perf_counter() - started)
                client.terminate_microvm(microvmIdentifier=vm["microvmId"])
        finally:
            server.stop()
    baseline = plain_app_first_200(args.runs)
    rss = sorted(rss_running)[len(rss_running) // 2]
    with open("/proc/meminfo") as meminfo:
        total = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))
    report: dict[str, Any] = {name: summary(values) for name, values in samples.items()}
    report["baseline: python3 app.py -> first 200"] = summary(baseline)
    report["RSS running MicroVM (MiB)"] = round(rss / 2**20, 1)
    report["RSS suspended MicroVM, frozen (MiB)"] = round(sorted(rss_frozen)[len(rss_frozen) // 2] / 2**20, 1)
    report["RSS suspended MicroVM, on disk (MiB)"] = round(
        sorted(rss_on_disk)[len(rss_on_disk) // 2] / 2**20, 1
    )
    report["running MicroVMs that fit in this machine's memory"] = int(total // max(rss, 1))
    report["running MicroVMs that fit in 8 GiB"] = int(8 * 2**30 // max(rss, 1))
    for name, value in report.items():
        print(f"{name:64} {value}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
