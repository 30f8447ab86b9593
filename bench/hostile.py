"""Hostile artifacts and apps (not a test): the CI cases of tests/reliability (hostile artifacts,
hostile apps, endpoint abuse) with a tally of what was contained, plus long cases CI cannot afford:
a RUN step that fills the disk, a RUN step that never ends (with one build slot), a Dockerfile of
thousands of instructions, and a bigger endpoint flood with a neighbour's latency measured.

    .venv/bin/python -m bench.hostile [--fill-mib 1024] [--hang-seconds 60] [--skip-ci-cases]

Prints one line per case: contained, NOT contained (a known bug, with its xfail test), or a
regression; then the figures of each long case.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability.conftest import TENANT_APP
from tests.reliability.hostile import BASE, zip_entries
from tests.reliability.invariants import sweep_cgroups
from tests.reliability.rawhttp import exchange
from tests.support.endpoint import auth_token
from tests.support.images import image_request, upload, wait_image_settled, wait_microvm, zip_dir
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess

REPO = Path(__file__).resolve().parent.parent
CI_CASES = [
    "tests/reliability/test_hostile_artifacts.py",
    "tests/reliability/test_hostile_apps.py",
    "tests/reliability/test_endpoint_abuse.py",
]


class _Outcomes:
    """A pytest plugin that remembers each test's outcome."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def pytest_runtest_logreport(self, report: Any) -> None:
        name = report.nodeid.split("::", 1)[1]
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            if hasattr(report, "wasxfail"):
                verdict = "NOT contained (known bug)" if report.skipped else "REGRESSION? xfail passed"
                self.rows.append((name, verdict, str(report.wasxfail)[:160]))
            elif report.passed:
                self.rows.append((name, "contained", ""))
            elif report.failed:
                self.rows.append((name, "REGRESSION (failed)", str(report.longrepr).splitlines()[-1][:160]))


def run_ci_cases() -> list[tuple[str, str, str]]:
    outcomes = _Outcomes()
    pytest.main(
        ["-q", "-p", "no:cacheprovider", "--no-header", "-rN", *[str(REPO / c) for c in CI_CASES]],
        plugins=[outcomes],
    )
    return outcomes.rows


def _df(path: Path) -> int:
    return shutil.disk_usage(path).free


def fill_disk_during_build(server: ServerProcess, moto: MotoServer, mib: int) -> None:
    client = server.client()
    dockerfile = (
        BASE + f"RUN dd if=/dev/zero of=/filler bs=1M count={mib} status=none && sync\nCMD sleep infinity\n"
    )
    free_before = _df(server.data_dir)
    lowest = free_before
    arn = client.create_microvm_image(
        **image_request("filler", upload(moto, zip_entries([("Dockerfile", dockerfile.encode())])))
    )["imageArn"]
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        lowest = min(lowest, _df(server.data_dir))
        state = client.get_microvm_image(imageIdentifier=arn)["state"]
        if state not in ("CREATING", "UPDATING"):
            break
        time.sleep(0.5)
    version = client.get_microvm_image_version(imageIdentifier=arn, imageVersion="1.0")
    after_build = _df(server.data_dir)
    client.delete_microvm_image(imageIdentifier=arn)
    time.sleep(5)
    after_delete = _df(server.data_dir)
    mib_of = lambda n: n // (1024 * 1024)  # noqa: E731
    print(
        f"  RUN writing {mib} MiB: image {state}, version {version['state']} "
        f"({(version.get('stateReason') or '')[:120]})"
    )
    print(
        f"  host free space: before {mib_of(free_before)} MiB, lowest during the build {mib_of(lowest)} MiB "
        f"(-{mib_of(free_before - lowest)}), after the build -{mib_of(free_before - after_build)} MiB, "
        f"after deleting the image -{mib_of(free_before - after_delete)} MiB"
    )
    print(
        f"  contained: {'NO - a build may use as much of the host disk as it likes' if free_before - lowest > mib * 1024 * 1024 // 2 else 'yes'}"
    )


def endless_run_step(moto: MotoServer, scratch: Path, seconds: float) -> None:
    server = ServerProcess(scratch / "one-slot", {"quotas": {"concurrent_builds": 1}}, env=moto.environment())
    server.start()
    try:
        client = server.client()
        endless = zip_entries([("Dockerfile", (BASE + "RUN sleep 100000\n").encode())])
        hang = client.create_microvm_image(**image_request("endless", upload(moto, endless)))["imageArn"]
        time.sleep(3)
        normal = client.create_microvm_image(**image_request("normal", upload(moto, zip_dir(TENANT_APP))))[
            "imageArn"
        ]
        time.sleep(seconds)
        states = {
            "endless": client.get_microvm_image(imageIdentifier=hang)["state"],
            "normal": client.get_microvm_image(imageIdentifier=normal)["state"],
        }
        builds = client.list_microvm_image_builds(imageIdentifier=normal, imageVersion="1.0")["items"]
        try:
            client.delete_microvm_image(imageIdentifier=hang)
            delete = "accepted"
        except Exception as error:  # the answer is the figure
            delete = str(error)[:160]
        print(
            f"  after {seconds:g} s with concurrent_builds=1: endless image {states['endless']}, a normal image "
            f"{states['normal']} (its build {builds[0]['buildState']})"
        )
        print(f"  DeleteMicrovmImage of the endless one: {delete}")
        contained = states["endless"] != "CREATING"
        print(
            f"  contained: {'yes' if contained else 'NO - no build timeout; the slot is held until the server stops'}"
        )
    finally:
        server.stop()
        sweep_cgroups(server.data_dir)


def many_instructions(server: ServerProcess, moto: MotoServer, count: int) -> None:
    client = server.client()
    dockerfile = BASE + "".join(f"ENV V{i}={i}\n" for i in range(count)) + "CMD sleep infinity\n"
    started = time.monotonic()
    arn = client.create_microvm_image(
        **image_request("many", upload(moto, zip_entries([("Dockerfile", dockerfile.encode())])))
    )["imageArn"]
    api = []
    while client.get_microvm_image(imageIdentifier=arn)["state"] in ("CREATING", "UPDATING"):
        t = time.monotonic()
        client.list_managed_microvm_images()
        api.append(time.monotonic() - t)
        if time.monotonic() - started > 1800:
            break
        time.sleep(1)
    version = client.get_microvm_image_version(imageIdentifier=arn, imageVersion="1.0")
    print(
        f"  {count} ENV instructions: {version['state']} after {time.monotonic() - started:.0f} s "
        f"({(version.get('stateReason') or '')[:100]}); API meanwhile p50 {statistics.median(api) * 1000:.0f} ms, "
        f"max {max(api) * 1000:.0f} ms"
    )


def big_flood(server: ServerProcess, moto: MotoServer, connections: int, seconds: float) -> None:
    client = server.client()
    arn = client.create_microvm_image(
        **image_request("flood", upload(moto, zip_dir(TENANT_APP)), resources=[{"minimumMemoryInMiB": 512}])
    )["imageArn"]
    wait_image_settled(client, arn)
    target = wait_microvm(client, client.run_microvm(imageIdentifier=arn)["microvmId"], {"RUNNING"})
    neighbour = wait_microvm(client, client.run_microvm(imageIdentifier=arn)["microvmId"], {"RUNNING"})
    tokens = {vm["microvmId"]: auth_token(client, vm["microvmId"]) for vm in (target, neighbour)}

    def request(vm: dict[str, Any], path: str) -> tuple[str, float]:
        started = time.monotonic()
        answer = exchange(
            server.port,
            f"GET {path} HTTP/1.1\r\nHost: {vm['endpoint']}\r\nX-aws-proxy-auth: "
            f"{tokens[vm['microvmId']]}\r\nConnection: close\r\n\r\n".encode(),
            timeout=90,
        )
        outcome = str(answer.status) if answer.status else ("timed out" if answer.timed_out else "no answer")
        return outcome, time.monotonic() - started

    stop = time.monotonic() + seconds
    outcomes: dict[str, int] = {}

    def flooder() -> None:
        while time.monotonic() < stop:
            outcome, _ = request(target, "/slow?seconds=1")
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    quiet = [request(neighbour, "/count")[1] for _ in range(20)]
    with concurrent.futures.ThreadPoolExecutor(connections + 1) as pool:
        for _ in range(connections):
            pool.submit(flooder)
        time.sleep(2)
        during = []
        while time.monotonic() < stop:
            outcome, took = request(neighbour, "/count")
            during.append(took if outcome == "200" else float("inf"))
            time.sleep(0.2)
    after, _ = request(target, "/count")
    for vm in (target, neighbour):
        client.terminate_microvm(microvmIdentifier=vm["microvmId"])
    print(
        f"  {connections} connections for {seconds:g} s at one MicroVM: {dict(sorted(outcomes.items()))}; "
        f"afterwards it answers {after}"
    )
    finite = [t for t in during if t != float("inf")]
    print(
        f"  neighbour: {len(during) - len(finite)} failed of {len(during)}; latency p50 quiet "
        f"{statistics.median(quiet) * 1000:.0f} ms, during the flood {statistics.median(finite) * 1000:.0f} ms, "
        f"max {max(finite) * 1000:.0f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fill-mib", type=int, default=1024)
    parser.add_argument("--hang-seconds", type=float, default=60)
    parser.add_argument("--instructions", type=int, default=1000)
    parser.add_argument("--flood-connections", type=int, default=300)
    parser.add_argument("--flood-seconds", type=float, default=30)
    parser.add_argument("--skip-ci-cases", action="store_true")
    args = parser.parse_args()

    rows = [] if args.skip_ci_cases else run_ci_cases()
    scratch = Path(tempfile.mkdtemp(prefix="omv-hostile-"))
    moto = MotoServer(scratch / "moto.log")
    moto.start()
    server = ServerProcess(scratch / "data", {}, env=moto.environment())
    server.start()
    try:
        print("\nlong cases:")
        print("- a RUN step that fills the disk")
        fill_disk_during_build(server, moto, args.fill_mib)
        print("- a RUN step that never ends")
        endless_run_step(moto, scratch, args.hang_seconds)
        print("- a Dockerfile of many instructions")
        many_instructions(server, moto, args.instructions)
        print("- a bigger endpoint flood")
        big_flood(server, moto, args.flood_connections, args.flood_seconds)
    finally:
        server.stop()
        sweep_cgroups(server.data_dir)
        moto.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    if rows:
        print("\nCI cases:")
        for name, verdict, detail in rows:
            print(f"  {verdict:28s} {name}{'  - ' + detail if detail else ''}")
        tally: dict[str, int] = {}
        for _, verdict, _ in rows:
            tally[verdict] = tally.get(verdict, 0) + 1
        print(f"cases tried: {len(rows)}; {tally}")
    return 1 if any(verdict.startswith("REGRESSION") for _, verdict, _ in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
