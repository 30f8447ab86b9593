"""A server with short test-only clocks, the echo app and the sample app built on it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.support.images import (
    ALL_HOOKS,
    REPO,
    image_request,
    sample_app_uri,
    upload,
    wait_image_settled,
    wait_microvm,
    zip_dir,
)
from tests.support.moto import MotoServer
from tests.support.server import DatabaseBackend, ServerProcess, free_port

ECHO_APP = REPO / "tests" / "apps" / "echo"
SHELL = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:SHELL_INGRESS"
HTTP = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:HTTP_INGRESS"


@pytest.fixture(scope="package")
def endpoint_server(
    tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, database_backend: DatabaseBackend
) -> Iterator[ServerProcess]:
    """A server whose auth-token "minute" lasts 2 s and whose idle minimum is 1 s (test-only knobs),
    serving TLS on a second port."""
    with database_backend.server(
        tmp_path_factory.mktemp("endpoint"),
        {"auth_token_minute_seconds": 2, "min_idle_seconds": 1, "tls_port": free_port()},
        env=moto.environment(),
    ) as server:
        server.start()
        yield server


@pytest.fixture(scope="package")
def echo_image(endpoint_server: ServerProcess, moto: MotoServer) -> str:
    client = endpoint_server.client()
    arn = client.create_microvm_image(
        **image_request("echo", upload(moto, zip_dir(ECHO_APP)), resources=[{"minimumMemoryInMiB": 512}])
    )["imageArn"]
    assert wait_image_settled(client, arn)["state"] == "CREATED"
    return arn


@pytest.fixture(scope="package")
def hooked_image(endpoint_server: ServerProcess, moto: MotoServer) -> str:
    client = endpoint_server.client()
    arn = client.create_microvm_image(
        **image_request(
            "hooked", sample_app_uri(moto), hooks=ALL_HOOKS, resources=[{"minimumMemoryInMiB": 512}]
        )
    )["imageArn"]
    assert wait_image_settled(client, arn)["state"] == "CREATED"
    return arn


def run_microvm(server: ServerProcess, arn: str, **kwargs: Any) -> dict[str, Any]:
    client = server.client(client_side_validation=False, validate="idlePolicy" not in kwargs)
    vm = client.run_microvm(imageIdentifier=arn, **kwargs)
    return wait_microvm(client, vm["microvmId"], {"RUNNING"})


@pytest.fixture(scope="package")
def echo_vm(endpoint_server: ServerProcess, echo_image: str) -> Iterator[dict[str, Any]]:
    vm = run_microvm(endpoint_server, echo_image, ingressNetworkConnectors=[HTTP, SHELL])
    yield vm
    endpoint_server.client().terminate_microvm(microvmIdentifier=vm["microvmId"])


@contextmanager
def idle_policy_microvm(
    server: ServerProcess, arn: str, max_idle_seconds: int, auto_resume: bool
) -> Iterator[dict[str, Any]]:
    """A MicroVM with HTTP ingress and an idle policy (seconds below AWS's minimum: the test
    server allows 1), terminated on leaving."""
    vm = run_microvm(
        server,
        arn,
        ingressNetworkConnectors=[HTTP],
        idlePolicy={
            "maxIdleDurationSeconds": max_idle_seconds,
            "suspendedDurationSeconds": 3600,
            "autoResumeEnabled": auto_resume,
        },
    )
    try:
        yield vm
    finally:
        server.client().terminate_microvm(microvmIdentifier=vm["microvmId"])
