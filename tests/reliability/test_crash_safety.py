"""SIGKILL at random and at chosen moments, restart, and check that the server held: legal states,
nothing stuck once recovered, nothing on the host without a record, no record without its
snapshot, and every acknowledged call's effect still there (invariants.py, crashes.py).

A few trials here; `python -m bench.crash_trials` runs hundreds."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.conftest import TENANT_APP
from tests.reliability.crashes import CrashHarness
from tests.reliability.invariants import (
    CGROUP_ROOT,
    HostView,
    read_snapshot,
    settled_violations,
    sweep_cgroups,
)
from tests.support.endpoint import app_state, auth_token
from tests.support.images import SAMPLE_APP, wait_for, wait_microvm
from tests.support.moto import MotoServer
from tests.support.server import DatabaseBackend, ServerProcess

# Scripted starts make sure the few CI trials hit a build, a suspend and a mix; the kill lands at
# a random moment within the given window.
PLANS: list[tuple[list[str], tuple[float, float]]] = [
    (["create-good"], (2.0, 4.0)),
    (["run", "run", "suspend"], (1.0, 3.0)),
    ([], (0.5, 5.0)),
]


@pytest.fixture(scope="module")
def harness(
    tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[CrashHarness]:
    data_dir = tmp_path_factory.mktemp("crash")
    try:
        with database_backend.server(data_dir, {}, env=moto.environment()) as server:
            server.start()
            made = CrashHarness(server, moto, SAMPLE_APP, TENANT_APP, seed=None)
            yield made
            made.terminate_everything()
    finally:
        sweep_cgroups(data_dir)


def test_random_crashes_keep_every_invariant(harness: CrashHarness) -> None:
    report = []
    for script, (low, high) in PLANS:
        result = harness.trial(kill_after=harness.rng.uniform(low, high), script=script)
        report.append(result.describe())
        assert not result.unexpected, "\n".join(report)
    print("\n".join(report))


def _sandbox_dir(server: ServerProcess, microvm_id: str) -> Path:
    return server.data_dir / "sandboxes" / "sandboxes" / microvm_id


def _state(server: ServerProcess, microvm_id: str) -> str:
    row = read_snapshot(server.data_dir).microvm(microvm_id)
    assert row is not None
    return str(row["state"])


def _restart_and_settle(harness: CrashHarness) -> None:
    harness.server.start()
    assert not [v for v in harness._wait_settled() if v.startswith("stuck")]


def _own_violations(harness: CrashHarness, microvm_id: str) -> list[str]:
    server = harness.server
    assert server.process is not None
    return [
        v for v in settled_violations(server.data_dir, frozenset({server.process.pid})) if microvm_id in v
    ]


def test_a_running_microvm_survives_a_crash_with_its_memory(harness: CrashHarness) -> None:
    client = harness.server.client()
    vm = wait_microvm(
        client, client.run_microvm(imageIdentifier=harness.stable_image)["microvmId"], {"RUNNING"}
    )
    token = auth_token(client, vm["microvmId"])
    before = app_state(harness.server, vm, token)
    harness.server.kill()
    _restart_and_settle(harness)
    client = harness.server.client()
    assert client.get_microvm(microvmIdentifier=vm["microvmId"])["state"] == "RUNNING"
    after = app_state(harness.server, vm, token)  # the token and the endpoint outlive the restart
    assert (after["id"], after["counter"]) == (before["id"], before["counter"] + 1)
    client.terminate_microvm(microvmIdentifier=vm["microvmId"])
    wait_microvm(client, vm["microvmId"], {"TERMINATED"})
    assert _own_violations(harness, vm["microvmId"]) == []


def test_a_microvm_being_started_survives_a_crash(harness: CrashHarness) -> None:
    server = harness.server
    client = server.client()
    for _ in range(3):  # until the kill lands while the sandbox is being restored
        microvm_id = client.run_microvm(imageIdentifier=harness.stable_image)["microvmId"]
        wait_for(_sandbox_dir(server, microvm_id).exists, 30, "the restore to begin", interval=0.005)
        server.kill()
        if _state(server, microvm_id) == "PENDING":
            break
        server.start()
        client = server.client()
    _restart_and_settle(harness)
    client = server.client()
    try:
        vm = client.get_microvm(microvmIdentifier=microvm_id)
        assert (vm["state"], vm.get("stateReason")) == ("RUNNING", None)
        assert _own_violations(harness, microvm_id) == []
    finally:
        client.terminate_microvm(microvmIdentifier=microvm_id)


def test_a_microvm_being_suspended_survives_a_crash(harness: CrashHarness) -> None:
    server = harness.server
    client = server.client()
    microvm_id = client.run_microvm(imageIdentifier=harness.stable_image)["microvmId"]
    wait_microvm(client, microvm_id, {"RUNNING"})
    client.suspend_microvm(microvmIdentifier=microvm_id)
    image = _sandbox_dir(server, microvm_id) / "suspended"
    wait_for(image.exists, 30, "the checkpoint to begin", interval=0.005)
    server.kill()
    _restart_and_settle(harness)
    client = server.client()
    try:
        vm = client.get_microvm(microvmIdentifier=microvm_id)
        assert (vm["state"], vm.get("stateReason")) == ("SUSPENDED", None)
        client.resume_microvm(microvmIdentifier=microvm_id)
        assert wait_microvm(client, microvm_id, {"RUNNING", "TERMINATED"})["state"] == "RUNNING"
    finally:
        client.terminate_microvm(microvmIdentifier=microvm_id)


def test_an_acknowledged_resume_survives_a_crash(harness: CrashHarness) -> None:
    server = harness.server
    client = server.client()
    microvm_id = client.run_microvm(imageIdentifier=harness.stable_image)["microvmId"]
    wait_microvm(client, microvm_id, {"RUNNING"})
    client.suspend_microvm(microvmIdentifier=microvm_id)
    wait_microvm(client, microvm_id, {"SUSPENDED"})
    client.resume_microvm(microvmIdentifier=microvm_id)
    server.kill()
    _restart_and_settle(harness)
    client = server.client()
    try:
        state = wait_for(
            lambda: (s := client.get_microvm(microvmIdentifier=microvm_id)["state"]) != "SUSPENDED" and s,
            15,
            "the acknowledged resume to complete",
        )
        assert state == "RUNNING"
        assert _own_violations(harness, microvm_id) == []
    finally:
        client.terminate_microvm(microvmIdentifier=microvm_id)


def test_terminate_while_suspending_ends_in_success(harness: CrashHarness) -> None:
    client = harness.server.client()
    microvm_id = client.run_microvm(imageIdentifier=harness.stable_image)["microvmId"]
    wait_microvm(client, microvm_id, {"RUNNING"})
    client.suspend_microvm(microvmIdentifier=microvm_id)
    client.terminate_microvm(microvmIdentifier=microvm_id)  # while its suspend hook runs
    vm = wait_microvm(client, microvm_id, {"TERMINATED"})
    assert vm["stateReason"] == "Success."


@pytest.mark.skipif(Path("/sys/fs/cgroup/cgroup.controllers").exists(), reason="cgroup v2: one hierarchy")
def test_recovery_removes_stray_cgroups_from_every_hierarchy(harness: CrashHarness) -> None:
    server = harness.server
    scope = HostView(server.data_dir).scopes()["gvisor"]
    key = secrets.token_hex(6)  # a sandbox key no record names: what a crash leaves behind
    made: list[Path] = []
    for hierarchy in ("memory", "pids", "blkio", "cpuset", "devices"):
        parent = CGROUP_ROOT / hierarchy / f"openmicrovm-{scope}"
        if not parent.parent.is_dir():
            continue
        if not parent.exists():
            parent.mkdir()
            made.append(parent)
        (parent / key).mkdir()
        made.append(parent / key)
    try:
        server.kill()
        _restart_and_settle(harness)
        left = [str(path) for path in made if path.name == key and path.exists()]
        assert left == []
    finally:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()
