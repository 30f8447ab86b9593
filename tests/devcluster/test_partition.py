"""A partition on the devcluster (issue 13): an agent cut off by taking its link down fences itself
(its process exits with status 75, its sandboxes are gone), the cluster declares its host lost (its
MicroVM TERMINATED, saying so), and nothing comes back when the link returns; the other agent goes
on running MicroVMs."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import psycopg
import pytest

from openmicrovm.devcluster import network, processes, s3
from tests.devcluster.conftest import agent_command_missing
from tests.devcluster.test_cluster import (
    START_TIMEOUT_SECONDS,
    STOP_TIMEOUT_SECONDS,
    Up,
    assert_nothing_left,
    microvms_client,
)
from tests.support.endpoint import auth_token
from tests.support.host import processes_naming
from tests.support.http import RawResponse, raw_request
from tests.support.images import (
    ALL_HOOKS,
    SAMPLE_APP,
    image_request,
    wait_for,
    wait_image_settled,
    wait_microvm,
    zip_dir,
)

LEASE_SECONDS = 3
# The agent fences itself within its lease, the cluster declares the host lost once the lease has
# run out; the rest is slack for a loaded machine.
CUT_OFF_WITHIN = LEASE_SECONDS + 17
# How long the link stays up again before we look for a resurrection: a few lease periods.
REJOINED_FOR = LEASE_SECONDS * 4


@pytest.fixture(scope="module", autouse=True)
def _needs_the_agent_command() -> None:
    missing = agent_command_missing()
    if missing:
        pytest.skip(missing)


@pytest.fixture
def up_cluster(tmp_path: Path) -> Iterator[Up]:
    """`up --hosts 2 --lease-seconds 3`; afterwards whatever a failed test left is stopped: the link
    brought back, `up` SIGTERMed (or killed and `down` run), namespaces and links swept."""
    up = Up(
        tmp_path / "cluster", tmp_path / "up.stderr", "--hosts", "2", "--lease-seconds", str(LEASE_SECONDS)
    )
    try:
        yield up
    finally:
        state = up.state() if (up.directory / "cluster.json").exists() else {}
        for agent in state.get("agents", []):
            subprocess.run(["ip", "link", "set", agent["link"], "up"], capture_output=True, timeout=30)
        up.stop_leftovers()


def call_endpoint(endpoint_url: str, vm: dict[str, Any], token: str) -> RawResponse:
    """GET / of a MicroVM through the cluster's endpoint (the balancer in front of the replicas)."""
    port = urlsplit(endpoint_url).port
    assert port is not None, endpoint_url
    return raw_request(
        port, "GET", "/", None, {"Host": f"{vm['endpoint']}:{port}", "X-aws-proxy-auth": token}
    )


def host_of(database_url: str, microvm_id: str) -> str:
    with psycopg.connect(database_url) as connection:
        row = connection.execute("SELECT host_id FROM microvms WHERE id = %s", (microvm_id,)).fetchone()
    assert row is not None and row[0], f"{microvm_id} is on no host: {row}"
    return str(row[0])


def host_id_of(agent: dict[str, Any]) -> str:
    return (Path(agent["data_dir"]) / "host-id").read_text().strip()


def sandboxes_of(agent: dict[str, Any]) -> dict[int, str]:
    return processes_naming(str(Path(agent["data_dir"]) / "sandboxes"))


def run_and_wait(client: Any, arn: str) -> dict[str, Any]:
    vm = client.run_microvm(imageIdentifier=arn)
    return wait_microvm(client, vm["microvmId"], {"RUNNING"}, timeout=300)


def test_an_agent_whose_link_goes_down_fences_itself_and_is_not_resurrected(up_cluster: Up) -> None:
    up = up_cluster
    printed = up.wait_for_endpoint()
    state = up.state()
    endpoint = state["endpoint"]
    database_url = state["postgres"]["url"]
    agents = state["agents"]
    assert len(agents) == 2

    # Deploy the sample app through the cluster's S3 and API.
    bucket = printed["artifacts"][0].removeprefix("s3://").split("/")[0]
    storage = boto3.client(
        "s3",
        endpoint_url=printed["s3"][0],
        region_name=s3.CREDENTIALS["AWS_DEFAULT_REGION"],
        aws_access_key_id=s3.CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3.CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    key = f"{uuid.uuid4().hex}/app.zip"
    storage.put_object(Bucket=bucket, Key=key, Body=zip_dir(SAMPLE_APP))
    client = microvms_client(endpoint)
    arn = client.create_microvm_image(
        **image_request(f"partition-{uuid.uuid4().hex[:6]}", f"s3://{bucket}/{key}", hooks=ALL_HOOKS)
    )["imageArn"]
    image = wait_image_settled(client, arn, timeout=START_TIMEOUT_SECONDS)
    assert image["state"] == "CREATED", image

    vm = run_and_wait(client, arn)
    microvm_id = vm["microvmId"]
    # Made while it runs (no token is given for a TERMINATED MicroVM), used after it has ended too.
    token = auth_token(client, microvm_id)
    answer = call_endpoint(endpoint, vm, token)
    assert answer.status == 200, (answer.status, answer.body)

    # The agent that holds it, and the other one.
    host_id = host_of(database_url, microvm_id)
    by_host = {host_id_of(agent): agent for agent in agents}
    assert host_id in by_host, f"{microvm_id} is on {host_id}, none of {sorted(by_host)}"
    cut = by_host[host_id]
    (other,) = [agent for agent in agents if agent is not cut]
    cut_process = processes.ProcessIdentity.from_json(cut)
    assert cut_process is not None and processes.is_running(cut_process)
    assert sandboxes_of(cut), f"no sandbox process of {cut['data_dir']}"

    # Cut it off.
    network.run_ip("link", "set", cut["link"], "down")
    cut_at = time.monotonic()
    seen: dict[str, float] = {}
    expected = ("agent exited", "sandboxes gone", "TERMINATED")
    while len(seen) < len(expected) and time.monotonic() - cut_at < CUT_OFF_WITHIN:
        now = time.monotonic() - cut_at
        if "agent exited" not in seen and not processes.is_running(cut_process):
            seen["agent exited"] = now
        if "sandboxes gone" not in seen and not sandboxes_of(cut):
            seen["sandboxes gone"] = now
        if (
            "TERMINATED" not in seen
            and client.get_microvm(microvmIdentifier=microvm_id)["state"] == "TERMINATED"
        ):
            seen["TERMINATED"] = now
        time.sleep(0.1)
    timings = ", ".join(f"{what} at {at:.1f} s" for what, at in seen.items())
    print(f"after {cut['link']} went down: {timings}")
    missing = [what for what in expected if what not in seen]
    assert not missing, (
        f"{CUT_OFF_WITHIN} s after {cut['link']} went down, still not: {missing} (seen: {timings or 'nothing'}); "
        f"sandboxes: {sandboxes_of(cut)}; the end of {cut['log']}:\n{processes.log_tail(Path(cut['log']), 40)}"
    )

    # `up` reaps the agent and says how it ended (it looks once a second).
    exit_line = f"{cut['name']} (pid {cut_process.pid}) "
    ended = wait_for(
        lambda: re.search(re.escape(exit_line) + r"(.*?);", up.stderr_path.read_text()),
        10,
        f"`up` to report the end of {cut['name']}",
    )
    assert ended.group(1) == "exited with status 75", ended.group(0)
    log_text = Path(cut["log"]).read_text(errors="replace")
    assert "fences itself" in log_text, log_text[-4000:]

    ended_vm = client.get_microvm(microvmIdentifier=microvm_id)
    reason = ended_vm.get("stateReason", "")
    assert ended_vm["state"] == "TERMINATED" and "was lost" in reason and host_id in reason, ended_vm
    answer = call_endpoint(endpoint, vm, token)
    assert answer.status == 502, (answer.status, answer.body)

    # The link comes back; nothing of the cut-off host does.
    network.run_ip("link", "set", cut["link"], "up")
    time.sleep(REJOINED_FOR)
    after = client.get_microvm(microvmIdentifier=microvm_id)
    assert after["state"] == "TERMINATED" and after.get("stateReason") == reason, after
    assert not sandboxes_of(cut), sandboxes_of(cut)
    assert not processes.is_running(cut_process)
    answer = call_endpoint(endpoint, vm, token)
    assert answer.status == 502, (answer.status, answer.body)

    # The other agent still runs MicroVMs.
    again = run_and_wait(client, arn)
    assert host_of(database_url, again["microvmId"]) == host_id_of(other)
    answer = call_endpoint(endpoint, again, auth_token(client, again["microvmId"]))
    assert answer.status == 200, (answer.status, answer.body)

    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(STOP_TIMEOUT_SECONDS) == 0, up.stderr_path.read_text()
    assert up.state()["status"] == "stopped"
    assert_nothing_left(state)
    for agent in agents:
        assert not sandboxes_of(agent), sandboxes_of(agent)
