"""Logs through the real server with real builds and MicroVMs: the size cap, and shipping to a
CloudWatch Logs server (moto) that goes away and comes back while a MicroVM runs.
Shipping waits on the lead's wiring of CloudWatchShipper into the server."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.helpers import (
    cli_json,
    deploy_sample,
    terminate_all,
)
from tests.logs import server_http
from tests.logs.tcp_proxy import SwitchableProxy
from tests.support.moto import MotoServer
from tests.support.server import DatabaseBackend, ServerProcess, free_port


def test_the_log_cap_holds_on_a_real_build(make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = make_server({"log_max_bytes": 1024, "log_keep_files": 2})
    name = f"capped-{uuid.uuid4().hex[:6]}"
    result = deploy_sample(server.url, tmp_path, name, "--output", "json")
    assert result.returncode == 0, result.stderr
    build_id = json.loads(result.stdout)["builds"][0]["buildId"]
    files = sorted((server.data_dir / "logs" / "builds").glob(f"{build_id}.log*"))
    assert 1 <= len(files) <= 2
    assert all(file.stat().st_size <= 1024 for file in files)
    status, page = server_http.logs(server.url, "builds", build_id)
    assert status == 200 and page["skippedBytes"] > 0  # the build wrote more than the cap keeps
    assert (
        server_http.messages(server_http.all_log_lines(server.url, "builds", build_id))[-1]
        == "build succeeded"
    )


def _events(client: Any, group: str, stream: str) -> list[str]:
    try:
        messages: list[str] = []
        arguments: dict[str, Any] = {"logGroupName": group, "logStreamName": stream, "startFromHead": True}
        while True:
            page = client.get_log_events(**arguments)
            messages += [event["message"] for event in page["events"]]
            if not page["events"] or page["nextForwardToken"] == arguments.get("nextToken"):
                return messages
            arguments["nextToken"] = page["nextForwardToken"]
    except client.exceptions.ResourceNotFoundException:
        return []


def _eventually(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.2)


@pytest.fixture
def shipping_server(
    tmp_path: Path, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[tuple[ServerProcess, SwitchableProxy]]:
    proxy = SwitchableProxy(moto.port, free_port())
    proxy.start()
    env = {
        **moto.environment(),
        "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": proxy.url,
        "OPENMICROVM_CLOUDWATCH_INTERVAL_SECONDS": "0.2",
        "OPENMICROVM_CLOUDWATCH_MAX_BACKOFF_SECONDS": "1",
    }
    try:
        with database_backend.server(tmp_path / "server", None, env=env) as server:
            server.start()
            yield server, proxy
    finally:
        proxy.stop()


def test_logs_reach_cloudwatch_through_an_outage_exactly_once(
    shipping_server: tuple[ServerProcess, SwitchableProxy], moto: MotoServer, tmp_path: Path
) -> None:
    server, proxy = shipping_server
    cloudwatch = moto.client("logs")
    name = f"shipped-{uuid.uuid4().hex[:6]}"
    build_group = f"/e2e/builds/{name}"
    deployed = deploy_sample(
        server.url,
        tmp_path,
        name,
        "--logging",
        f"cloudwatch:{build_group}",
        "--output",
        "json",
    )
    assert deployed.returncode == 0, deployed.stderr
    build_id = json.loads(deployed.stdout)["builds"][0]["buildId"]
    build_lines = server_http.messages(server_http.all_log_lines(server.url, "builds", build_id))

    def build_stream() -> str:
        found = cloudwatch.describe_log_streams(logGroupName=build_group)["logStreams"]
        return found[0]["logStreamName"] if found else ""

    _eventually(
        lambda: (
            bool(cloudwatch.describe_log_groups(logGroupNamePrefix=build_group)["logGroups"])
            and bool(build_stream())
        ),
        "the build's stream was created",
    )
    assert build_stream().endswith(f"[1.0]{build_id}")
    _eventually(
        lambda: len(_events(cloudwatch, build_group, build_stream())) >= len(build_lines), "build log shipped"
    )
    assert _events(cloudwatch, build_group, build_stream()) == build_lines

    run_group = f"/e2e/runs/{name}"
    microvm = cli_json(server.url, tmp_path, "run", name, "--logging", f"cloudwatch:{run_group}:vm")
    microvm_id = microvm["microvmId"]
    try:
        _eventually(
            lambda: "state: RUNNING" in _events(cloudwatch, run_group, "vm"), "the run's first events shipped"
        )
        proxy.stop()  # CloudWatch goes away while the MicroVM keeps working
        cli_json(server.url, tmp_path, "suspend", microvm_id)
        cli_json(server.url, tmp_path, "resume", microvm_id)
        time.sleep(1)  # a few shipping attempts fail meanwhile
        assert _events(cloudwatch, run_group, "vm").count("state: SUSPENDED") == 0
        proxy.start()
        cli_json(server.url, tmp_path, "terminate", microvm_id)
    finally:
        terminate_all(server.client(), [microvm_id])
    _eventually(
        lambda: "state: TERMINATED" in _events(cloudwatch, run_group, "vm"), "events after the outage shipped"
    )
    time.sleep(1)  # anything sent twice would show up by now
    run_lines = server_http.messages(server_http.all_log_lines(server.url, "microvms", microvm_id))
    assert _events(cloudwatch, run_group, "vm") == run_lines
    assert run_lines.count("state: RUNNING") == 2 and run_lines.count("state: SUSPENDED") == 1
