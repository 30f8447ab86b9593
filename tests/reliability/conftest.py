"""Servers and images the reliability tests share. Builds are the slow part (~7 s each, warm), so
each package-scoped image is built once and all tests of the package use it; every MicroVM a test
runs is terminated by that test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.fuzzing import Identifiers
from tests.reliability.invariants import sweep_cgroups
from tests.support.images import image_request, upload, wait_image_settled, zip_dir
from tests.support.moto import MotoServer
from tests.support.server import DatabaseBackend, ServerProcess

TENANT_APP = Path(__file__).resolve().parent / "apps" / "tenant"
ALICE = {"access_key_id": "AKIDALICE", "secret_access_key": "alice-secret", "account_id": "111111111111"}
BOB = {"access_key_id": "AKIDBOB", "secret_access_key": "bob-secret", "account_id": "222222222222"}
# A "minute" of an endpoint token lasts this long on the hostile server (replay-after-expiry tests).
TOKEN_MINUTE_SECONDS = 5
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
MAX_ARTIFACT_FILES = 2000


def build_images(client: Any, requests: list[dict[str, Any]]) -> list[str]:
    """Create several images at once (their builds run side by side) and wait for all of them."""
    arns = [client.create_microvm_image(**request)["imageArn"] for request in requests]
    for arn in arns:
        image = wait_image_settled(client, arn)
        assert image["state"] == "CREATED", client.list_microvm_image_builds(
            imageIdentifier=arn, imageVersion="1.0"
        )
    return arns


def tenant_request(moto: MotoServer, name: str) -> dict[str, Any]:
    return image_request(name, upload(moto, zip_dir(TENANT_APP)), resources=[{"minimumMemoryInMiB": 512}])


def client_for(server: ServerProcess, who: dict[str, str], region: str = "us-east-1", **options: Any) -> Any:
    return server.client(region=region, key=who["access_key_id"], secret=who["secret_access_key"], **options)


def seed_identifiers(server: ServerProcess) -> Identifiers:
    """Give a server of ALICE's and BOB's keys something to fuzz against: two images (and their
    builds) of ALICE's, one of BOB's, and a MicroVM id that exists nowhere."""
    alice, bob = client_for(server, ALICE), client_for(server, BOB)
    never_built = "s3://no-such-bucket-openmicrovm/app.zip"
    own = [
        alice.create_microvm_image(**image_request(f"fuzz-{i}", never_built))["imageArn"] for i in range(2)
    ]
    foreign = [bob.create_microvm_image(**image_request("fuzz-bob", never_built))["imageArn"]]
    builds = [
        b["buildId"]
        for arn in own
        for b in alice.list_microvm_image_builds(imageIdentifier=arn, imageVersion="1.0")["items"]
    ]
    return Identifiers(tuple(own), tuple(foreign), (f"microvm-{uuid.uuid4()}",), tuple(builds))


@pytest.fixture(scope="package")
def keyed_server(
    tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[ServerProcess]:
    """A server with two accounts' access keys: every request must carry a valid SigV4 signature."""
    with database_backend.server(
        tmp_path_factory.mktemp("keyed"), {"access_keys": [ALICE, BOB]}, env=moto.environment()
    ) as server:
        server.start()
        yield server


@pytest.fixture(scope="package")
def alice(keyed_server: ServerProcess) -> Any:
    return client_for(keyed_server, ALICE)


@pytest.fixture(scope="package")
def bob(keyed_server: ServerProcess) -> Any:
    return client_for(keyed_server, BOB)


@pytest.fixture(scope="package")
def hostile_server(
    tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[ServerProcess]:
    """The server hostile artifacts, hostile apps and endpoint abusers meet: small artifact limits,
    endpoint tokens whose minutes last TOKEN_MINUTE_SECONDS."""
    settings = {
        "auth_token_minute_seconds": TOKEN_MINUTE_SECONDS,
        "max_artifact_bytes": MAX_ARTIFACT_BYTES,
        "max_artifact_files": MAX_ARTIFACT_FILES,
    }
    with database_backend.server(
        tmp_path_factory.mktemp("hostile"), settings, env=moto.environment()
    ) as server:
        server.start()
        yield server
    sweep_cgroups(server.data_dir)


@pytest.fixture(scope="package")
def tenant_image(hostile_server: ServerProcess, moto: MotoServer) -> str:
    """The tenant app (tests/reliability/apps/tenant), 512 MiB, on the hostile server."""
    client = hostile_server.client()
    return build_images(client, [tenant_request(moto, f"tenant-{uuid.uuid4().hex[:6]}")])[0]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
