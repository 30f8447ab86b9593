"""The whole devcluster: `up` until its endpoint answers, then SIGTERM, or SIGKILL and `down`; either
way nothing of it is left (processes, namespaces, links, PostgreSQL's temporary directory)."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from openmicrovm.devcluster import network, processes
from tests.devcluster.conftest import agent_command_missing

START_TIMEOUT_SECONDS = 600
STOP_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module", autouse=True)
def _needs_the_agent_command() -> None:
    missing = agent_command_missing()
    if missing:
        pytest.skip(missing)


class Up:
    """`python -m openmicrovm.devcluster up` as a test runs it: stdout read line by line, stderr in a
    file shown when something fails."""

    def __init__(self, directory: Path, stderr_path: Path, *arguments: str) -> None:
        self.directory = directory
        self.stderr_path = stderr_path
        self.lines: queue.Queue[str | None] = queue.Queue()
        with open(stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "openmicrovm.devcluster", "up", "--dir", str(directory), *arguments],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for_endpoint(self) -> dict[str, list[str]]:
        """The lines printed up to `endpoint`, by their first word."""
        printed: dict[str, list[str]] = {}
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"`up` ended before its endpoint line:\n{self.stderr_path.read_text()}")
            kind, _, value = line.partition(" ")
            printed.setdefault(kind, []).append(value)
            if kind == "endpoint":
                return printed
        pytest.fail(f"no endpoint line within {START_TIMEOUT_SECONDS} s:\n{self.stderr_path.read_text()}")

    def state(self) -> dict[str, Any]:
        return json.loads((self.directory / "cluster.json").read_text())

    def stop_leftovers(self) -> None:
        """After a test, whatever it left: `up` SIGTERMed (killed if it hangs), then `down` and a
        sweep of its namespaces and links."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if (self.directory / "cluster.json").exists():
            subprocess.run(
                [sys.executable, "-m", "openmicrovm.devcluster", "down", "--dir", str(self.directory)],
                capture_output=True,
                timeout=STOP_TIMEOUT_SECONDS,
            )
            network.sweep(network.Naming(self.state()["id"]))


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[Any]:
    """Starts `up`; afterwards stops whatever a failed test left, by SIGTERM or `down`."""
    started: list[Up] = []

    def start(*arguments: str) -> Up:
        up = Up(tmp_path / f"cluster{len(started)}", tmp_path / f"up{len(started)}.stderr", *arguments)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop_leftovers()


def recorded_processes(state: dict[str, Any]) -> list[processes.ProcessIdentity]:
    records = [*state["agents"], *state["replicas"], state.get("postgres") or {}, state.get("s3") or {}]
    return [identity for record in records if (identity := processes.ProcessIdentity.from_json(record))]


def assert_nothing_left(state: dict[str, Any]) -> None:
    alive = [identity.pid for identity in recorded_processes(state) if processes.is_running(identity)]
    assert alive == [], f"still running: {alive}"
    assert network.leftovers(network.Naming(state["id"])) == ([], [])
    assert not Path(state["postgres"]["directory"]).exists() or not state["postgres"]["temporary"]


def microvms_client(url: str) -> Any:
    return boto3.client(
        "lambda-microvms",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="any",
        aws_secret_access_key="any",
    )


def test_up_serves_the_api_through_its_endpoint_and_sigterm_removes_everything(start_up: Any) -> None:
    up = start_up("--hosts", "2", "--lease-seconds", "5")
    printed = up.wait_for_endpoint()

    state = up.state()
    assert state["status"] == "running"
    assert printed["s3"] == [state["s3"]["url"]]
    assert (
        printed["replica"] == [replica["url"] for replica in state["replicas"]]
        and len(printed["replica"]) == 2
    )
    assert printed["endpoint"] == [state["endpoint"]]
    assert len(state["agents"]) == 2
    assert state["environment"]["agent"]["OPENMICROVM_HOST_LEASE_SECONDS"] == "5"
    namespaces, links = network.leftovers(network.Naming(state["id"]))
    assert namespaces == sorted(agent["netns"] for agent in state["agents"])
    assert {agent["link"] for agent in state["agents"]} <= set(links)
    for url in (state["endpoint"], *printed["replica"]):
        images = microvms_client(url).list_managed_microvm_images()["items"]
        assert images and all("imageArn" in image for image in images)

    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(STOP_TIMEOUT_SECONDS) == 0, up.stderr_path.read_text()

    assert up.state()["status"] == "stopped"
    assert_nothing_left(state)


def test_down_stops_the_cluster_of_a_killed_up(start_up: Any) -> None:
    up = start_up("--hosts", "2")
    up.wait_for_endpoint()
    state = up.state()

    up.process.kill()
    up.process.wait()
    assert any(processes.is_running(identity) for identity in recorded_processes(state))

    done = subprocess.run(
        [sys.executable, "-m", "openmicrovm.devcluster", "down", "--dir", str(up.directory)],
        capture_output=True,
        text=True,
        timeout=STOP_TIMEOUT_SECONDS,
    )

    assert done.returncode == 0, done.stderr
    assert "nothing is left" in done.stderr
    assert up.state()["status"] == "stopped"
    assert_nothing_left(state)
