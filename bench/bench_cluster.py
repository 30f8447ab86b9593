"""Many hosts (issue 13 figures): the same app, in the same run, on the all-in-one server (`serve`
on SQLite) and on a cluster of one API replica (`serve --no-agent`) and one host agent
(`openmicrovm agent`) on a private PostgreSQL, where the replica relays every endpoint request to
the agent that runs the MicroVM.

    .venv/bin/python bench/bench_cluster.py [--runs 10] [--seconds 3] [--concurrency 8] [--lost-rounds 3]

Prints, as medians (p10/p90): RunMicrovm → first 200 from the sample app through its endpoint on
each (runs interleaved, each MicroVM terminated after its first 200) and their ratio; requests per
second and p50/p99 latency of GET / from --concurrency keep-alive clients through each endpoint
(and, for scale, straight into the all-in-one server's sandbox, no endpoint at all), and the p50
added by the extra hop (cluster p50 − all-in-one p50); and the time from `kill -9` of
the agent to GetMicrovm saying TERMINATED, beside host_lease_seconds, split into the part of the
lease that was left at the kill and the time the cluster took once it had lapsed; and, for the
agent started again on its data dir, start → ACTIVE and ACTIVE → holding the image's version again
(in between, a RunMicrovm of that version is refused: it is on no active host).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.common import Opener, build_image, first_200, load, summary
from tests.support.cluster import ClusterUnderTest
from tests.support.endpoint import auth_token
from tests.support.images import ALL_HOOKS, SAMPLE_APP
from tests.support.postgres import temporary_cluster
from tests.support.server import ServerProcess

LEASE_SECONDS = 3.0


def _wait_state(client: Any, microvm_id: str, state: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        vm = client.get_microvm(microvmIdentifier=microvm_id)
        if vm["state"] == state:
            return vm
        if time.monotonic() > deadline:
            raise RuntimeError(f"{microvm_id} is {vm['state']}, not {state}, after {timeout:g} s: {vm}")
        time.sleep(0.01)


def _run_to_first_200(front: ServerProcess, arn: str) -> float:
    """RunMicrovm → first 200 through the endpoint of `front` (held while PENDING, then served);
    the MicroVM is terminated afterwards, outside the time."""
    client = front.client(validate=False)
    started = time.perf_counter()
    vm = client.run_microvm(imageIdentifier=arn)
    first_200(front.port, f"{vm['endpoint']}:{front.port}", auth_token(client, vm["microvmId"], minutes=30))
    elapsed = time.perf_counter() - started
    client.terminate_microvm(microvmIdentifier=vm["microvmId"])
    return elapsed


def _front_door(port: int) -> Opener:
    async def open_connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)

    return open_connection


async def _load_rounds(
    solo: ServerProcess, solo_microvm_id: str, requests: dict[str, tuple[Opener | None, bytes]], args: Any
) -> dict[str, list[dict[str, float]]]:
    """Rounds taken in turn: straight into the all-in-one server's sandbox (a connection made by its
    sandbox driver, opened read-only from here: no endpoint at all), then through each endpoint."""
    from openmicrovm.config import default_cache_dir
    from openmicrovm.runtime import make_driver

    driver = make_driver("auto", solo.data_dir / "sandboxes", default_cache_dir())
    sandbox = await driver.adopt(solo_microvm_id)
    assert sandbox is not None, f"no sandbox for {solo_microvm_id} under {solo.data_dir}"

    async def direct() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await driver.connect(sandbox, 8080)

    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in requests}
    for _ in range(args.load_rounds):
        for name, (opener, request) in requests.items():
            rounds[name].append(await load(opener or direct, request, args.seconds, args.concurrency))
    return rounds


def _endpoint_load(fronts: dict[str, ServerProcess], arns: dict[str, str], args: argparse.Namespace) -> Any:
    """GET / of one running MicroVM on each, --concurrency keep-alive clients for --seconds,
    --load-rounds rounds taken in turn; the medians of the rounds."""
    requests: dict[str, tuple[Opener | None, bytes]] = {}
    started: list[tuple[Any, str]] = []
    microvm_ids: dict[str, str] = {}
    try:
        for name, front in fronts.items():
            client = front.client(validate=False)
            vm = client.run_microvm(imageIdentifier=arns[name])
            started.append((client, vm["microvmId"]))
            microvm_ids[name] = vm["microvmId"]
            _wait_state(client, vm["microvmId"], "RUNNING")
            host = f"{vm['endpoint']}:{front.port}"
            token = auth_token(client, vm["microvmId"], minutes=30)
            first_200(front.port, host, token)
            request = f"GET / HTTP/1.1\r\nHost: {host}\r\nX-aws-proxy-auth: {token}\r\n\r\n".encode()
            if name == "all-in-one":
                requests["direct"] = (None, b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n")
            requests[name] = (_front_door(front.port), request)
        rounds = asyncio.run(_load_rounds(fronts["all-in-one"], microvm_ids["all-in-one"], requests, args))
    finally:
        for client, microvm_id in started:
            with contextlib.suppress(Exception):
                client.terminate_microvm(microvmIdentifier=microvm_id)
    return {
        name: {
            "requests_per_second": round(statistics.median(r["requests_per_second"] for r in runs)),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
        }
        for name, runs in rounds.items()
    }


def _lease_expires_at(cluster: ClusterUnderTest, host_id: str) -> float:
    import psycopg

    with psycopg.connect(cluster.database_url) as connection:
        row = connection.execute("SELECT lease_expires_at FROM hosts WHERE id = %s", (host_id,)).fetchone()
    assert row is not None, f"no host {host_id}"
    return float(row[0])


def _lost_host(cluster: ClusterUnderTest, arn: str) -> dict[str, float]:
    """kill -9 of the agent that runs a MicroVM → GetMicrovm says TERMINATED, and the part of the
    lease that was left at the kill; then the agent is started again on its data dir: start →
    ACTIVE (a new incarnation), ACTIVE → holding the image's version again. Seconds."""
    client = cluster.client(validate=False)
    agent = cluster.agents[0]
    vm = client.run_microvm(imageIdentifier=arn)
    _wait_state(client, vm["microvmId"], "RUNNING")
    agent.kill()
    killed, killed_wall = time.monotonic(), time.time()
    host_id = (agent.data_dir / "host-id").read_text().strip()
    # Read after the kill: no heartbeat can move it any more.
    lease_left = _lease_expires_at(cluster, host_id) - killed_wall
    ended = _wait_state(client, vm["microvmId"], "TERMINATED", timeout=LEASE_SECONDS + 60)
    detected = time.monotonic() - killed
    if "was lost" not in ended.get("stateReason", "") or host_id not in ended["stateReason"]:
        raise RuntimeError(f"TERMINATED without the lost-host reason: {ended}")
    restarted = time.monotonic()
    agent.start()
    active_at = _wait_rejoined(cluster, host_id, arn)
    return {
        "detected": detected,
        "lease_left": lease_left,
        "active": active_at - restarted,
        "holding": time.monotonic() - active_at,
    }


def _wait_rejoined(cluster: ClusterUnderTest, host_id: str, arn: str, timeout: float = 60.0) -> float:
    """Until the restarted agent holds a lease again and has recorded that it holds the image's
    version; returns when (time.monotonic()) it was first seen ACTIVE. Both are written in one
    transaction, so the second figure should be 0: a run placed in a gap between them would find
    the version on no active host (InsufficientCapacityException)."""
    import psycopg

    active_at = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg.connect(cluster.database_url) as connection:
            row = connection.execute(
                "SELECT EXISTS (SELECT 1 FROM host_versions WHERE host_id = hosts.id AND image_arn = %s) "
                "FROM hosts WHERE id = %s AND state = 'ACTIVE' "
                "AND lease_expires_at > EXTRACT(EPOCH FROM clock_timestamp())",
                (arn, host_id),
            ).fetchone()
        if row is not None:
            active_at = active_at or time.monotonic()
            if row[0]:
                return active_at
        time.sleep(0.01)
    state = "ACTIVE" if active_at else "not ACTIVE"
    raise RuntimeError(
        f"the restarted agent {host_id} ({state}) did not hold {arn} again within {timeout:g} s"
    )


def _seconds(values: list[float]) -> dict[str, float]:
    return {
        "p50_s": round(statistics.median(values), 2),
        "min_s": round(min(values), 2),
        "max_s": round(max(values), 2),
        "n": len(values),
    }


def _log_tails(processes: list[ServerProcess], lines: int = 30) -> str:
    return "\n".join(
        f"==> {process.log_path} (last {lines} lines)\n" + "\n".join(process.log().splitlines()[-lines:])
        for process in processes
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one load round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--load-rounds", type=int, default=3)
    parser.add_argument("--lost-rounds", type=int, default=3)
    parser.add_argument(
        "--refill-seconds", type=float, default=1.5, help="pause that lets the warm pool refill"
    )
    args = parser.parse_args()
    to_first_200: dict[str, list[float]] = {"all-in-one": [], "cluster": []}
    with tempfile.TemporaryDirectory(prefix="openmicrovm-bench-cluster-") as scratch_dir:
        scratch = Path(scratch_dir)
        with contextlib.ExitStack() as stack:
            # Unwound in reverse: the servers (and `openmicrovm cleanup` of their sandboxes, which
            # reads the database) stop before PostgreSQL does.
            postgres = stack.enter_context(temporary_cluster(keep_log_in=scratch))
            cluster = ClusterUnderTest(
                scratch / "cluster",
                postgres.create_database(),
                {"host_lease_seconds": LEASE_SECONDS, "artifact_file_roots": [str(scratch)]},
                hosts=1,
                replicas=1,
            )
            stack.callback(cluster.stop)
            solo = ServerProcess(scratch / "solo")
            stack.callback(solo.stop)
            try:
                solo.start()
                cluster.start()
                fronts = {"all-in-one": solo, "cluster": cluster.main}
                arns = {
                    name: build_image(front, f"sample-{name}", SAMPLE_APP, scratch, hooks=ALL_HOOKS)
                    for name, front in fronts.items()
                }
                for name, front in fronts.items():  # not timed: each warm pool filled once
                    _run_to_first_200(front, arns[name])
                for run in range(args.runs):
                    order = list(fronts) if run % 2 == 0 else list(reversed(fronts))
                    for name in order:
                        time.sleep(args.refill_seconds)
                        to_first_200[name].append(_run_to_first_200(fronts[name], arns[name]))
                load = _endpoint_load(fronts, arns, args)
                lost = [_lost_host(cluster, arns["cluster"]) for _ in range(args.lost_rounds)]
            except BaseException:
                print(_log_tails([solo, *cluster.replicas, *cluster.agents]), file=sys.stderr)
                raise

    report: dict[str, Any] = {
        "RunMicrovm -> first 200, all-in-one serve (SQLite)": summary(to_first_200["all-in-one"]),
        "RunMicrovm -> first 200, cluster (replica relays to agent)": summary(to_first_200["cluster"]),
    }
    report["first 200 cluster / all-in-one (p50)"] = round(
        statistics.median(to_first_200["cluster"]) / statistics.median(to_first_200["all-in-one"]), 2
    )
    report[f"GET / x{args.concurrency} keep-alive, straight into the sandbox"] = load["direct"]
    report[f"GET / x{args.concurrency} keep-alive, all-in-one endpoint"] = load["all-in-one"]
    report[f"GET / x{args.concurrency} keep-alive, cluster endpoint (relayed)"] = load["cluster"]
    report["requests/s cluster / all-in-one"] = round(
        load["cluster"]["requests_per_second"] / load["all-in-one"]["requests_per_second"], 2
    )
    report["p50 added by the extra hop (ms)"] = round(
        load["cluster"]["p50_ms"] - load["all-in-one"]["p50_ms"], 3
    )
    report["host_lease_seconds"] = LEASE_SECONDS
    for name, key in (
        ("kill -9 agent -> GetMicrovm TERMINATED", "detected"),
        ("  of which the lease left at the kill", "lease_left"),
        ("  of which lease lapsed -> TERMINATED", None),
        ("agent started again -> ACTIVE (new incarnation)", "active"),
        ("ACTIVE -> holding its version again (runs refused meanwhile)", "holding"),
    ):
        report[name] = _seconds(
            [round_["detected"] - round_["lease_left"] if key is None else round_[key] for round_ in lost]
        )
    for name, value in report.items():
        print(f"{name:64} {value}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
