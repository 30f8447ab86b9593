"""Where the warm pool does not help (issue 18): cold runs, a burst, density, teardown, the API
while sandboxes come and go, a restart with strays and `openmicrovm cleanup`, each beside
`python3 app.py` started the same number of times in the same run.

    .venv/bin/python bench/bench_scale.py [--count 200] [--burst 20] [--callers 10]

Phases, in this order, on one real server with the sample app (restore pool as configured):
  cold       RunMicrovm → first 200 through the endpoint, back to back (the pool is empty)
  burst      --burst RunMicrovm calls at once → each first 200 (p50, p95, errors)
  density    ramp to --count running MicroVMs, each answering through its endpoint; host
             MemAvailable before and after (MiB per MicroVM)
  teardown   TerminateMicrovm of all of them from --callers threads → all TERMINATED, while
             another thread times GetMicrovm (p50/p99, beside the same calls while idle)
  restart    --count running, SIGKILL the server, its database gone: every sandbox is a stray;
             server start → listening, and → every stray gone
  cleanup    --count running, SIGKILL the server: `openmicrovm cleanup` of the data dir
Baselines: `python3 app.py` → first 200 one after another, --burst of them at once, and
--count of them running (MemAvailable per process). Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.common import build_image, first_200, percentile, plain_app_first_200
from tests.support.endpoint import auth_token
from tests.support.images import SAMPLE_APP
from tests.support.server import RECOVERY_FINISHED, ServerProcess, free_port


def mem_available() -> int:
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))


def ms(values: list[float], fraction: float) -> float:
    return round(percentile(values, fraction) * 1000, 1) if values else float("nan")


def settle(seconds: float = 3.0) -> None:
    """Let page cache and background work settle before a memory reading."""
    time.sleep(seconds)


# -- baselines -----------------------------------------------------------------------------------


def unique_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def start_plain_apps(ports: list[int]) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [sys.executable, str(SAMPLE_APP / "app.py")],
            env={**os.environ, "PORT": str(port)},
            stdout=subprocess.DEVNULL,
        )
        for port in ports
    ]


def stop_plain_apps(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait()


def pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        return next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))


def plain_burst(count: int) -> list[float]:
    """`count` copies of the app started at once: seconds from the common start to each first 200."""
    ports = unique_ports(count)
    started = time.perf_counter()
    processes = start_plain_apps(ports)

    def answered(port: int) -> float:
        first_200(port, f"127.0.0.1:{port}")
        return time.perf_counter() - started

    try:
        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(answered, ports))
    finally:
        stop_plain_apps(processes)


def plain_density(count: int) -> tuple[float, float]:
    """MiB each running idle copy of the app takes: (MemAvailable drop, PSS) per copy."""
    before = mem_available()
    ports = unique_ports(count)
    processes = start_plain_apps(ports)
    try:
        for port in ports:
            first_200(port, f"127.0.0.1:{port}")
        settle()
        dropped = (before - mem_available()) / count / 2**20
        return dropped, sum(pss_bytes(process.pid) for process in processes) / count / 2**20
    finally:
        stop_plain_apps(processes)


# -- MicroVMs ------------------------------------------------------------------------------------


class Fleet:
    """MicroVMs of one image on one server, driven from many threads (a boto3 client each)."""

    def __init__(self, server: ServerProcess, arn: str) -> None:
        self.server = server
        self.arn = arn
        self._local = threading.local()

    def client(self) -> Any:
        if getattr(self._local, "client", None) is None:
            self._local.client = self.server.client(validate=False)
        return self._local.client

    def run_to_first_200(self, started: float | None = None) -> tuple[str, float]:
        """RunMicrovm, then GET / through its endpoint until 200: (id, seconds since `started`)."""
        started = time.perf_counter() if started is None else started
        client = self.client()
        vm = client.run_microvm(imageIdentifier=self.arn)
        token = auth_token(client, vm["microvmId"], minutes=30)
        first_200(self.server.port, f"{vm['endpoint']}:{self.server.port}", token, timeout=120)
        return vm["microvmId"], time.perf_counter() - started

    def answers(self, microvm_id: str) -> bool:
        client = self.client()
        vm = client.get_microvm(microvmIdentifier=microvm_id)
        try:
            first_200(
                self.server.port, f"{vm['endpoint']}:{self.server.port}", auth_token(client, microvm_id), 30
            )
        except RuntimeError:
            return False
        return True

    def terminate(self, microvm_id: str) -> None:
        self.client().terminate_microvm(microvmIdentifier=microvm_id)

    def wait_terminated(self, ids: list[str], timeout: float) -> None:
        client, deadline, waiting = self.client(), time.monotonic() + timeout, set(ids)
        while waiting and time.monotonic() < deadline:
            for microvm_id in list(waiting):
                if client.get_microvm(microvmIdentifier=microvm_id)["state"] == "TERMINATED":
                    waiting.discard(microvm_id)
            time.sleep(0.1)
        if waiting:
            raise RuntimeError(f"{len(waiting)} MicroVM(s) not TERMINATED within {timeout:g} s")

    def ramp(self, count: int, callers: int) -> list[str]:
        with ThreadPoolExecutor(callers) as pool:
            return [microvm_id for microvm_id, _ in pool.map(lambda _: self.run_to_first_200(), range(count))]


def time_get_calls(
    fleet: Fleet, microvm_id: str, until: Callable[[], bool], timeout: float = 60
) -> list[float]:
    """GetMicrovm of one MicroVM over and over until `until()`: seconds per call (a call that gets no
    answer within `timeout` counts as `timeout`)."""
    client = fleet.server.client(validate=False)
    samples = []
    while not until():
        started = time.perf_counter()
        try:
            client.get_microvm(microvmIdentifier=microvm_id)
        except Exception:  # a read timeout: the API did not answer
            pass
        samples.append(min(time.perf_counter() - started, timeout))
        time.sleep(0.02)
    return samples


def sandbox_count(data_dir: Path) -> int:
    sandboxes = data_dir / "sandboxes" / "sandboxes"
    return sum(1 for _ in sandboxes.iterdir()) if sandboxes.is_dir() else 0


def timed_cleanup(server: ServerProcess) -> float:
    started = time.perf_counter()
    server.cleanup(timeout=1800)
    return time.perf_counter() - started


# -- the phases ----------------------------------------------------------------------------------


def cold_runs(fleet: Fleet, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        microvm_id, seconds = fleet.run_to_first_200()
        samples.append(seconds)
        fleet.terminate(microvm_id)
    return samples


def burst(fleet: Fleet, count: int) -> tuple[list[float], int, list[str]]:
    errors = 0
    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(fleet.run_to_first_200, started) for _ in range(count)]
    samples, ids = [], []
    for future in futures:
        try:
            microvm_id, seconds = future.result()
        except Exception as error:
            errors += 1
            print(f"  burst error: {error}", file=sys.stderr)
            continue
        ids.append(microvm_id)
        samples.append(seconds)
    return samples, errors, ids


def _probe(fleet: Fleet, microvm_id: str, done: ProcessEvent, results: Connection) -> None:
    results.send(time_get_calls(fleet, microvm_id, done.is_set))


def teardown(fleet: Fleet, ids: list[str], callers: int) -> tuple[float, list[float]]:
    """Terminate `ids` from `callers` threads; (seconds until all TERMINATED, GetMicrovm times meanwhile).
    The GetMicrovm calls come from a process of their own: in this one they would wait for the
    callers' threads to let go of the GIL, and that wait would be counted as the server's."""
    context = multiprocessing.get_context("fork")
    done = context.Event()
    receiving, sending = context.Pipe(duplex=False)
    probe = context.Process(target=_probe, args=(fleet, ids[0], done, sending), daemon=True)
    probe.start()
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(callers) as pool:
            list(pool.map(fleet.terminate, ids))
        fleet.wait_terminated(ids, timeout=1800)
        seconds = time.perf_counter() - started
    finally:
        done.set()
    timings = receiving.recv()
    probe.join()
    return seconds, timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--count", type=int, default=200, help="MicroVMs for density, teardown, restart, cleanup"
    )
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--callers", type=int, default=10, help="threads that run and terminate")
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument(
        "--phases", default="cold,burst,density,teardown,restart,cleanup", help="comma-separated subset"
    )
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if "teardown" in phases:
        phases.add("density")  # the teardown takes down what the density ramp ran
    report: dict[str, Any] = {}

    def row(name: str, value: Any, baseline: Any = "") -> None:
        report[name] = {"value": value, "baseline": baseline}
        print(f"{name:58} {value!s:>24}   {baseline}", flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="omv-scale-"))
    server = ServerProcess(scratch / "data", {"suspend_to_disk_after_seconds": 3600})
    server.start()
    try:
        arn = build_image(server, "scale", SAMPLE_APP, scratch)
        fleet = Fleet(server, arn)
        settle(2.0)  # the restore pool fills
        if "cold" in phases:
            plain = plain_app_first_200(args.cold_runs)
            row(
                "RunMicrovm -> first 200, pool empty (median ms)",
                ms(cold_runs(fleet, args.cold_runs)[1:], 0.5),  # the first is the pool's
                f"python3 app.py {ms(plain, 0.5)}",
            )
        if "burst" in phases:
            plain = plain_burst(args.burst)
            settle(2.0)
            samples, errors, ids = burst(fleet, args.burst)
            row(
                f"{args.burst} RunMicrovm at once -> first 200 (p50/p95 ms, errors)",
                f"{ms(samples, 0.5)}/{ms(samples, 0.95)}, {errors}",
                f"python3 app.py x{args.burst}: {ms(plain, 0.5)}/{ms(plain, 0.95)}",
            )
            with ThreadPoolExecutor(args.callers) as pool:
                list(pool.map(fleet.terminate, ids))
            fleet.wait_terminated(ids, timeout=600)
        if "density" in phases:
            plain_dropped, plain_pss = plain_density(args.count)
            settle()
            before = mem_available()
            started = time.perf_counter()
            ids = fleet.ramp(args.count, args.callers)
            ramp_seconds = time.perf_counter() - started
            settle()
            per_microvm = (before - mem_available()) / args.count / 2**20
            with ThreadPoolExecutor(args.callers) as pool:
                answering = sum(1 for ok in pool.map(fleet.answers, ids) if ok)
            row(
                f"host memory per running idle MicroVM, {args.count} running (MiB)",
                round(per_microvm, 1),
                f"python3 app.py x{args.count}: {plain_dropped:.1f} (PSS {plain_pss:.1f})",
            )
            row(f"of {args.count} running, answering through the endpoint", answering)
            row(f"ramp to {args.count} running ({args.callers} callers), s", round(ramp_seconds, 1))
            if "teardown" in phases:
                idle = time_get_calls(fleet, ids[0], _after(50))
                seconds, busy = teardown(fleet, ids, args.callers)
                row(
                    f"TerminateMicrovm of {args.count} ({args.callers} callers) -> all TERMINATED, s",
                    round(seconds, 1),
                )
                row(
                    "GetMicrovm while they terminate (p50/p99/max ms)",
                    f"{ms(busy, 0.5)}/{ms(busy, 0.99)}/{ms(busy, 1.0)}",
                    f"idle: {ms(idle, 0.5)}/{ms(idle, 0.99)}",
                )
        if "restart" in phases:
            fleet.ramp(args.count, args.callers)
            server.kill()
            for name in os.listdir(server.data_dir):
                if name.startswith("openmicrovm.db"):
                    os.unlink(server.data_dir / name)
            strays = sandbox_count(server.data_dir)
            recoveries = server.log().count(RECOVERY_FINISHED)
            started = time.perf_counter()
            server.start(timeout=1800, recovered=False)
            listening = time.perf_counter() - started
            while server.log().count(RECOVERY_FINISHED) == recoveries:  # its namespaces, cgroups, ... too
                time.sleep(0.05)
            gone = time.perf_counter() - started
            if sandbox_count(server.data_dir):
                raise RuntimeError(f"strays left after the recovery: {sandbox_count(server.data_dir)}")
            row(f"restart with {strays} stray sandboxes -> listening, s", round(listening, 2))
            row(f"restart with {strays} stray sandboxes -> all gone, s", round(gone, 2))
            arn = build_image(server, "scale", SAMPLE_APP, scratch)  # the database was new
            fleet = Fleet(server, arn)
        if "cleanup" in phases:
            fleet.ramp(args.count, args.callers)
            server.kill()
            row(
                f"openmicrovm cleanup with {args.count} running sandboxes, s",
                round(timed_cleanup(server), 1),
            )
            server.start(timeout=600)
    finally:
        server.stop(timeout=600)
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(report))


def _after(calls: int) -> Callable[[], bool]:
    count = iter(range(calls + 1))
    return lambda: next(count) >= calls


if __name__ == "__main__":
    main()
