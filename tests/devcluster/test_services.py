"""PostgreSQL and S3 as the devcluster runs them: reachable from the host on 127.0.0.1 and from an
agent's namespace through the bridge address, and gone once stopped."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import boto3
import psycopg
import pytest

from openmicrovm.devcluster import network, postgres, processes, s3
from openmicrovm.devcluster.cluster import free_port
from openmicrovm.devcluster.relay import TcpRelay
from tests.devcluster.conftest import run_in_namespace


@pytest.fixture
def agent_network(naming: network.Naming) -> Iterator[tuple[str, network.AgentNetwork, str]]:
    """(subnet, one agent's namespace, bridge address)."""
    subnet = network.create_bridge(naming)
    yield str(subnet), network.add_agent_namespace(naming, 1, subnet), network.bridge_address(subnet)


def test_postgresql_answers_the_host_and_an_agent_namespace(
    tmp_path: Path, naming: network.Naming, agent_network: tuple[str, network.AgentNetwork, str]
) -> None:
    subnet, agent, gateway = agent_network
    directory, temporary = postgres.choose_directory(tmp_path, naming.cluster_id)
    # pytest's temp dirs are closed to the postgres account: the server lives in a temp dir then.
    assert temporary == (not postgres.account_can_reach(tmp_path))
    try:
        server = postgres.initialize(directory, free_port(), subnet)
        process = postgres.start(server, ["127.0.0.1", gateway], tmp_path / "postgres.log")
        try:
            asyncio.run(postgres.wait_ready(server))
            asyncio.run(postgres.create_database(server))
            with psycopg.connect(server.url(), connect_timeout=5) as connection:
                assert connection.execute("SELECT current_database()").fetchone() == (postgres.DATABASE,)

            reached = run_in_namespace(
                agent.netns,
                "import psycopg\n"
                f"with psycopg.connect({server.url(gateway)!r}, connect_timeout=5) as connection:\n"
                "    print(connection.execute('SELECT host(inet_client_addr())').fetchone()[0])\n",
            )
            assert reached.stdout.strip() == agent.address, reached.stderr

            wrong_password = server.url(gateway).replace(server.password, "not-the-password")
            refused = run_in_namespace(
                agent.netns, f"import psycopg\npsycopg.connect({wrong_password!r}, connect_timeout=5)\n"
            )
            assert "password authentication failed" in refused.stderr
        finally:
            asyncio.run(postgres.stop(process))
        assert not process.running()
        assert processes.group_members(process.identity) == []
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_s3_answers_an_agent_namespace_through_the_forwarder(
    tmp_path: Path, agent_network: tuple[str, network.AgentNetwork, str]
) -> None:
    _, agent, gateway = agent_network

    async def scenario() -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = s3.start(port, tmp_path / "s3.log")
        forwarder = TcpRelay(gateway, 0, [("127.0.0.1", port)])
        try:
            await s3.wait_ready(process, port)
            await s3.create_buckets(url, [s3.ARTIFACT_BUCKET, s3.SNAPSHOT_BUCKET])
            await forwarder.start()
            # As a build on an agent reads an artifact: boto3 with AWS_ENDPOINT_URL_S3 and the keys.
            environment = {**s3.CREDENTIALS, "AWS_ENDPOINT_URL_S3": forwarder.url}
            code = (
                "import os, boto3\n"
                f"os.environ.update({environment!r})\n"
                "client = boto3.client('s3')\n"
                f"client.put_object(Bucket={s3.SNAPSHOT_BUCKET!r}, Key='versions/v1', Body=b'snapshot')\n"
                f"print(client.get_object(Bucket={s3.ARTIFACT_BUCKET!r}, Key='app.zip')['Body'].read().decode())\n"
            )
            host_client = boto3.client(
                "s3",
                endpoint_url=url,
                region_name="us-east-1",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
            host_client.put_object(Bucket=s3.ARTIFACT_BUCKET, Key="app.zip", Body=b"zip bytes")

            done = await asyncio.to_thread(run_in_namespace, agent.netns, code, 60)

            assert done.stdout.strip() == "zip bytes", done.stderr
            stored = host_client.get_object(Bucket=s3.SNAPSHOT_BUCKET, Key="versions/v1")["Body"].read()
            assert stored == b"snapshot"
        finally:
            await forwarder.close()
            await s3.stop(process)
        assert not process.running()

    asyncio.run(scenario())
