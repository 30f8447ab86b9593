"""MicroVM calls that race, on a real built image and real sandboxes: RunMicrovm against the memory
quota, and SuspendMicrovm against TerminateMicrovm. Each backend gets a server of its own, with a
memory quota of exactly two MicroVMs of the image, and builds the sample app once on it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.api.test_concurrent_writes import race, tally
from tests.reliability.invariants import read_snapshot, record_violations, settled_violations
from tests.support.images import ALL_HOOKS, image_request, wait_image_settled, wait_microvm
from tests.support.moto import MotoServer
from tests.support.server import DatabaseBackend, ServerProcess

MEMORY_MIB = 512
MICROVMS_ALLOWED = 2
RUNNERS = 8
SUSPEND_TERMINATE_ROUNDS = 3


@pytest.fixture(scope="module")
def quota_server(
    tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[ServerProcess]:
    """A server whose memory quota holds exactly MICROVMS_ALLOWED MicroVMs of quota_image. Its own,
    not the shared one: the quota is a server setting, and these tests fill it."""
    settings = {"quotas": {"microvm_memory_mib": MICROVMS_ALLOWED * MEMORY_MIB}}
    data_dir = tmp_path_factory.mktemp("quota-server")
    with database_backend.server(data_dir, settings, env=moto.environment()) as process:
        process.start()
        yield process


@pytest.fixture(scope="module")
def quota_image(quota_server: ServerProcess, sample_uri: str) -> str:
    """The ARN of a CREATED sample-app image (every hook enabled) of MEMORY_MIB on quota_server."""
    client = quota_server.client()
    arn = client.create_microvm_image(
        **image_request(
            f"race-{uuid.uuid4().hex[:8]}",
            sample_uri,
            hooks=ALL_HOOKS,
            resources=[{"minimumMemoryInMiB": MEMORY_MIB}],
        )
    )["imageArn"]
    image = wait_image_settled(client, arn)
    assert image["state"] == "CREATED", client.list_microvm_image_builds(
        imageIdentifier=arn, imageVersion="1.0"
    )
    # The quota above was sized from this: the version must run with exactly that much memory.
    version = client.get_microvm_image_version(imageIdentifier=arn, imageVersion="1.0")
    assert version["resources"] == [{"minimumMemoryInMiB": MEMORY_MIB}], version["resources"]
    return arn


def own_violations(server: ServerProcess, microvm_ids: set[str]) -> list[str]:
    """Record and host violations (a sandbox, namespace, cgroup or process left) of these MicroVMs."""
    assert server.process is not None
    return [
        problem
        for problem in settled_violations(server.data_dir, frozenset({server.process.pid}))
        if any(microvm_id in problem for microvm_id in microvm_ids)
    ]


def test_memory_quota_admits_exactly_two_of_eight_concurrent_runs(
    quota_server: ServerProcess, quota_image: str
) -> None:
    clients = [quota_server.client() for _ in range(RUNNERS)]
    answers = race(
        [lambda client=client: client.run_microvm(imageIdentifier=quota_image) for client in clients]
    )
    admitted = [answer.body()["microvmId"] for answer in answers if answer.succeeded]
    client = quota_server.client()
    try:
        assert tally(answers) == {
            "ok": MICROVMS_ALLOWED,
            "ServiceQuotaExceededException 402": RUNNERS - MICROVMS_ALLOWED,
        }, answers
        # The refused runs left no record behind, and the admitted ones really run.
        listed = {item["microvmId"] for item in client.list_microvms(imageIdentifier=quota_image)["items"]}
        assert listed == set(admitted)
        for microvm_id in admitted:
            assert wait_microvm(client, microvm_id, {"RUNNING", "TERMINATED"})["state"] == "RUNNING"
    finally:
        for microvm_id in admitted:
            client.terminate_microvm(microvmIdentifier=microvm_id)
    for microvm_id in admitted:
        wait_microvm(client, microvm_id, {"TERMINATED"})
    assert own_violations(quota_server, set(admitted)) == []
    assert record_violations(read_snapshot(quota_server.data_dir)) == []


@pytest.mark.parametrize("round_number", range(SUSPEND_TERMINATE_ROUNDS))
def test_suspend_and_terminate_at_once_end_terminated(
    quota_server: ServerProcess, quota_image: str, round_number: int
) -> None:
    client = quota_server.client()
    microvm_id = client.run_microvm(imageIdentifier=quota_image)["microvmId"]
    try:
        wait_microvm(client, microvm_id, {"RUNNING"})
        suspender, terminator = quota_server.client(), quota_server.client()
        suspend, terminate = race(
            [
                lambda: suspender.suspend_microvm(microvmIdentifier=microvm_id),
                lambda: terminator.terminate_microvm(microvmIdentifier=microvm_id),
            ]
        )
        # Terminate is accepted in every live state, SUSPENDING included.
        assert terminate.succeeded, terminate
        # Suspend either came first (and is then cut short by the terminate) or found the MicroVM
        # already terminating, which the API refuses as for a terminated one.
        if not suspend.succeeded:
            assert (suspend.code, suspend.status) == ("ValidationException", 400), suspend
            assert suspend.message == (
                f"The MicroVM {microvm_id} has been terminated and its state cannot be changed."
            )
        ended = wait_microvm(client, microvm_id, {"TERMINATED"})
        assert ended["stateReason"] == "Success.", ended
    finally:
        client.terminate_microvm(microvmIdentifier=microvm_id)
    assert own_violations(quota_server, {microvm_id}) == []
