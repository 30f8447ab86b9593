"""Many hosts on one machine: API replicas (`serve --no-agent`) and host agents (`openmicrovm
agent`), real processes on one PostgreSQL database, real builds and sandboxes.

What a fleet must survive: an agent killed (its MicroVMs end with a reason, the others' do not),
an agent cut off from the database (it stops its own sandboxes before the cluster gives up on it,
and nothing comes back when it returns), a replica killed (the client retries on the other; the
timers move), two replicas placing at once (no quota overshoot), and strangers at an agent's port.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from botocore.exceptions import ClientError

from tests.support.cluster import TEST_LEASE_SECONDS, ClusterUnderTest
from tests.support.endpoint import app_state, auth_token
from tests.support.host import processes_naming
from tests.support.images import (
    ALL_HOOKS,
    image_request,
    sample_app_uri,
    wait_for,
    wait_image_settled,
    wait_microvm,
)
from tests.support.moto import MotoServer
from tests.support.postgres import PostgresCluster

# A lost host is noticed once its lease has run out, by the replica that holds the watch lease,
# which ticks four times a second; the rest is slack for a loaded machine.
LOST_WITHIN = TEST_LEASE_SECONDS + 10


@pytest.fixture
def cluster(
    tmp_path: Path, postgres_cluster: PostgresCluster, moto: MotoServer
) -> Iterator[ClusterUnderTest]:
    url = postgres_cluster.create_database()
    made = ClusterUnderTest(
        tmp_path,
        url,
        # One build at a time per host, so that two images build on two hosts.
        {"quotas": {"concurrent_builds": 1}, "min_idle_seconds": 1},
        env=moto.environment(),
        hosts=2,
        replicas=2,
    )
    try:
        made.start()
        yield made
    finally:
        try:
            made.stop()
        finally:
            postgres_cluster.drop_database(url)


def image_on_each_host(cluster: ClusterUnderTest, moto: MotoServer) -> list[str]:
    """Two images of the sample app, built side by side: one on each agent."""
    client = cluster.client()
    uri = sample_app_uri(moto)
    arns = [
        client.create_microvm_image(
            **image_request(
                f"app-{n}-{uuid.uuid4().hex[:6]}",
                uri,
                hooks=ALL_HOOKS,
                resources=[{"minimumMemoryInMiB": 512}],
            )
        )["imageArn"]
        for n in range(2)
    ]
    for arn in arns:
        assert wait_image_settled(client, arn)["state"] == "CREATED", cluster.log()
    return arns


def running(cluster: ClusterUnderTest, arn: str, **kwargs: Any) -> dict[str, Any]:
    # An idle policy under the model's 60 s minimum (min_idle_seconds) passes no client-side check.
    client = cluster.client(client_side_validation=False, validate="idlePolicy" not in kwargs)
    vm = client.run_microvm(imageIdentifier=arn, **kwargs)
    return wait_microvm(client, vm["microvmId"], {"RUNNING"})


def test_microvms_on_two_hosts_answer_through_either_replica_and_a_killed_host_ends_only_its_own(
    cluster: ClusterUnderTest, moto: MotoServer
) -> None:
    first_arn, second_arn = image_on_each_host(cluster, moto)
    one, two = running(cluster, first_arn), running(cluster, second_arn)
    host_one, host_two = cluster.agent_of(one["microvmId"]), cluster.agent_of(two["microvmId"])
    assert host_one is not host_two, "the two images were built (and so run) on the same host"

    # Either replica's front door reaches either host's MicroVM (relayed to the agent).
    for replica in cluster.replicas:
        for vm in (one, two):
            state = app_state(replica, vm, auth_token(replica.client(), vm["microvmId"]))
            assert state["microvmId"] == vm["microvmId"]

    # Suspend and resume go to the owning host; the app keeps its memory.
    client = cluster.client()
    before = app_state(cluster.main, two, auth_token(client, two["microvmId"]))["counter"]
    client.suspend_microvm(microvmIdentifier=two["microvmId"])
    wait_microvm(client, two["microvmId"], {"SUSPENDED"})
    client.resume_microvm(microvmIdentifier=two["microvmId"])
    wait_microvm(client, two["microvmId"], {"RUNNING"})
    after = app_state(cluster.replicas[1], two, auth_token(client, two["microvmId"]))["counter"]
    assert after == before + 1

    # kill -9 of one agent: its MicroVM ends with a reason that names the lost host, within the
    # lease; the other host's MicroVM is untouched and still answers.
    host_one.kill()
    killed_at = time.monotonic()
    ended = wait_microvm(client, one["microvmId"], {"TERMINATED"}, timeout=LOST_WITHIN)
    assert "was lost" in ended["stateReason"], ended
    assert (host_one.data_dir / "host-id").read_text().strip() in ended["stateReason"]
    print(
        f"lost host noticed {time.monotonic() - killed_at:.1f} s after kill -9 (lease {TEST_LEASE_SECONDS:g} s)"
    )
    assert client.get_microvm(microvmIdentifier=two["microvmId"])["state"] == "RUNNING"
    assert app_state(cluster.main, two, auth_token(client, two["microvmId"]))["microvmId"] == two["microvmId"]

    # Runs now go to the host that is left, which fetches nothing it does not have: the second
    # image's version is on it.
    three = running(cluster, second_arn)
    assert cluster.agent_of(three["microvmId"]) is host_two


def test_a_version_built_on_one_host_runs_on_another_through_the_snapshot_store(
    tmp_path: Path, postgres_cluster: PostgresCluster, moto: MotoServer
) -> None:
    """No shared disk: the builder publishes the version's outputs to S3; once the builder is gone,
    the other host fetches them and runs the MicroVM from the same snapshot."""
    bucket = f"snapshots-{uuid.uuid4().hex[:8]}"
    moto.client("s3").create_bucket(Bucket=bucket)
    url = postgres_cluster.create_database()
    cluster = ClusterUnderTest(
        tmp_path,
        url,
        {"snapshot_store_url": f"s3://{bucket}/versions", "snapshot_store_endpoint_url": moto.url},
        env=moto.environment(),
        hosts=2,
    )
    try:
        cluster.start()
        client = cluster.client()
        arn = client.create_microvm_image(
            **image_request(f"anywhere-{uuid.uuid4().hex[:6]}", sample_app_uri(moto), hooks=ALL_HOOKS)
        )["imageArn"]
        assert wait_image_settled(client, arn)["state"] == "CREATED", cluster.log()
        builds = client.list_microvm_image_builds(imageIdentifier=arn, imageVersion="1.0")["items"]
        assert [build["buildState"] for build in builds] == ["SUCCESSFUL"]
        builder = cluster.agent_of_build(builds[0]["buildId"])
        stored = moto.client("s3").list_objects_v2(Bucket=bucket, Prefix="versions/manifests/")
        assert stored.get("KeyCount") == 1, stored
        builder.stop()  # with its disk: only the snapshot store still has the outputs
        vm = running(cluster, arn, runHookPayload="elsewhere")
        runner = cluster.agent_of(vm["microvmId"])
        assert runner is not builder
        state = app_state(cluster.main, vm, auth_token(client, vm["microvmId"]))
        assert (state["microvmId"], state["payload"]) == (vm["microvmId"], "elsewhere")
        assert list((runner.data_dir / "versions").iterdir()), "no fetched copy in the runner's cache"
    finally:
        try:
            cluster.stop()
        finally:
            postgres_cluster.drop_database(url)


def test_an_agent_cut_off_from_the_database_fences_itself_and_nothing_comes_back(
    cluster: ClusterUnderTest, moto: MotoServer, postgres_cluster: PostgresCluster
) -> None:
    client = cluster.client()
    arn = client.create_microvm_image(**image_request(f"fence-{uuid.uuid4().hex[:6]}", sample_app_uri(moto)))[
        "imageArn"
    ]
    assert wait_image_settled(client, arn)["state"] == "CREATED"
    vm = running(cluster, arn)
    agent = cluster.agent_of(vm["microvmId"])
    assert processes_naming(str(agent.data_dir / "sandboxes")), "no sandbox process found for the MicroVM"

    # Every agent loses the database for longer than its lease.
    postgres_cluster.stop()
    try:
        assert agent.process is not None
        agent.process.wait(timeout=TEST_LEASE_SECONDS * 4)
        assert agent.process.returncode == 75, agent.log()
    finally:
        postgres_cluster.start()
    assert "fences itself" in agent.log()
    # Fenced: its sandboxes are gone before the cluster could even say the host was lost.
    assert not processes_naming(str(agent.data_dir / "sandboxes"))

    # The database is back: the MicroVM ends, with the reason, and stays ended once the agent
    # (restarted, as its supervisor would) rejoins as a new incarnation.
    # Every agent fenced itself, but one may still be on its way out (a call waiting out its pool
    # timeout): restart each once it has exited, as a supervisor would, not only those already gone.
    for other in cluster.agents:
        if other.process is not None:
            other.process.wait(timeout=TEST_LEASE_SECONDS * 4)
            assert other.process.returncode == 75, other.log()
            other.start()
    ended = wait_microvm(client, vm["microvmId"], {"TERMINATED"}, timeout=LOST_WITHIN)
    assert ended["stateReason"], ended
    time.sleep(TEST_LEASE_SECONDS)
    assert client.get_microvm(microvmIdentifier=vm["microvmId"])["state"] == "TERMINATED"
    cluster.wait_hosts(len(cluster.agents))
    again = running(cluster, arn)
    assert again["state"] == "RUNNING"


def test_a_build_whose_host_is_lost_is_built_again_on_another(
    cluster: ClusterUnderTest, moto: MotoServer
) -> None:
    client = cluster.client()
    arn = client.create_microvm_image(
        **image_request(f"rebuild-{uuid.uuid4().hex[:6]}", sample_app_uri(moto))
    )["imageArn"]

    def building() -> dict[str, Any] | None:
        items = client.list_microvm_image_builds(imageIdentifier=arn, imageVersion="1.0")["items"]
        return items[0] if items and items[0]["buildState"] == "IN_PROGRESS" else None

    build = wait_for(building, 120, "the build to start")
    first = cluster.agent_of_build(build["buildId"])
    first.kill()
    assert wait_image_settled(client, arn)["state"] == "CREATED", cluster.log()
    assert cluster.agent_of_build(build["buildId"]) is not first
    vm = running(cluster, arn)
    assert cluster.agent_of(vm["microvmId"]) is not first


def test_two_replicas_placing_twenty_runs_at_once_never_overshoot_the_quota(
    tmp_path: Path, postgres_cluster: PostgresCluster, moto: MotoServer
) -> None:
    url = postgres_cluster.create_database()
    quota_vms = 5
    cluster = ClusterUnderTest(
        tmp_path,
        url,
        {"quotas": {"microvm_memory_mib": 512 * quota_vms}},
        env=moto.environment(),
        hosts=2,
        replicas=2,
    )
    try:
        cluster.start()
        client = cluster.client()
        arn = client.create_microvm_image(
            **image_request(
                f"quota-{uuid.uuid4().hex[:6]}", sample_app_uri(moto), resources=[{"minimumMemoryInMiB": 512}]
            )
        )["imageArn"]
        assert wait_image_settled(client, arn)["state"] == "CREATED"
        clients = [replica.client() for replica in cluster.replicas]

        def run(n: int) -> str:
            try:
                return clients[n % 2].run_microvm(imageIdentifier=arn)["microvmId"]
            except ClientError as error:
                return error.response["Error"]["Code"]

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            outcomes = list(pool.map(run, range(20)))
        started = [o for o in outcomes if o.startswith("microvm-")]
        refused = [o for o in outcomes if o == "ServiceQuotaExceededException"]
        assert len(started) == quota_vms and len(refused) == 20 - quota_vms, outcomes
        listed = client.list_microvms()["items"]
        assert len([vm for vm in listed if vm["state"] != "TERMINATED"]) == quota_vms
        for microvm_id in started:
            assert wait_microvm(client, microvm_id, {"RUNNING", "TERMINATED"})["state"] == "RUNNING"
    finally:
        try:
            cluster.stop()
        finally:
            postgres_cluster.drop_database(url)


def lenient_list(replica: Any) -> list[dict[str, Any]]:
    return replica.client(validate=False).list_microvms()["items"]


def test_a_replica_killed_mid_request_loses_nothing_and_its_timers_move(
    cluster: ClusterUnderTest, moto: MotoServer
) -> None:
    client = cluster.client()
    arn = client.create_microvm_image(
        **image_request(f"replica-{uuid.uuid4().hex[:6]}", sample_app_uri(moto))
    )["imageArn"]
    assert wait_image_settled(client, arn)["state"] == "CREATED"
    first, second = cluster.replicas
    vm = running(
        cluster,
        arn,
        idlePolicy={"maxIdleDurationSeconds": 2, "suspendedDurationSeconds": 600, "autoResumeEnabled": True},
    )

    # A RunMicrovm whose replica dies before the client reads the answer: the client retries on the
    # other replica with the same clientToken and gets the one MicroVM the first may have made.
    token = str(uuid.uuid4())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: first.client().run_microvm(imageIdentifier=arn, clientToken=token))
        first.kill()
        try:
            answered: str | None = pending.result()["microvmId"]
        except Exception:  # the connection was cut: exactly what a client retries
            answered = None
    retried = second.client().run_microvm(imageIdentifier=arn, clientToken=token)["microvmId"]
    assert answered in (None, retried)
    made = [item for item in lenient_list(second) if item["microvmId"] != vm["microvmId"]]
    assert [item["microvmId"] for item in made] == [retried]

    # The killed replica may have held the timers' lease: the idle timer still fires, from the other.
    lenient = second.client(validate=False)  # its idle policy is below the model's minimum
    suspended = wait_microvm(lenient, vm["microvmId"], {"SUSPENDED"}, timeout=TEST_LEASE_SECONDS + 15)
    assert suspended["state"] == "SUSPENDED"
    first.start()  # for the fixture's stop and cleanup


def test_an_agent_port_answers_only_proofs_of_the_cluster_secret(cluster: ClusterUnderTest) -> None:
    agent = cluster.agents[0]
    with psycopg.connect(cluster.database_url) as connection:
        row = connection.execute("SELECT value FROM meta WHERE key = 'cluster_secret'").fetchone()
    assert row is not None
    secret = bytes.fromhex(row[0])
    request = {"op": "logs", "stream": "microvms/microvm-x", "after": 0, "limit": 100}

    def sign(key: bytes, challenge: str, body: dict[str, Any]) -> str:
        text = json.dumps(body, sort_keys=True)
        return hmac.new(key, f"{challenge}\n{text}".encode(), hashlib.sha256).hexdigest()

    def attempt(line: Callable[[str], bytes]) -> tuple[str, bytes]:
        """Send line(challenge); the challenge, and all the agent said after it until it hung up."""
        with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as connection:
            stream = connection.makefile("rwb")
            greeting = stream.readline()
            assert greeting.startswith(b"OMV-RELAY 1 ")
            challenge = greeting.split()[-1].decode()
            stream.write(line(challenge))
            stream.flush()
            return challenge, stream.read()

    def first_answer(said: bytes) -> dict[str, Any]:
        return json.loads(said.splitlines()[0])

    denied = {"ok": False, "error": "denied", "message": "proof of the cluster secret failed"}
    unsigned = attempt(lambda challenge: json.dumps(request).encode() + b"\n")[1]
    assert first_answer(unsigned) == denied, unsigned
    wrong_key = attempt(
        lambda c: json.dumps(dict(request, proof=sign(b"x" * 32, c, request))).encode() + b"\n"
    )[1]
    assert first_answer(wrong_key) == denied, wrong_key
    assert attempt(lambda challenge: b"not json at all\n")[1] == b""  # cut off without a word

    # With the secret, the agent answers; the same proof on another connection (a new challenge)
    # is refused: a recorded request cannot be replayed.
    proofs: list[bytes] = []

    def signed(challenge: str) -> bytes:
        proofs.append(json.dumps(dict(request, proof=sign(secret, challenge, request))).encode() + b"\n")
        return proofs[-1]

    accepted = attempt(signed)[1]
    assert first_answer(accepted)["ok"] is True, accepted
    replayed = attempt(lambda challenge: proofs[0])[1]
    assert first_answer(replayed) == denied, replayed
    assert "Traceback" not in agent.log(), agent.log()
