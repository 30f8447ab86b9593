"""A sample-app image built once per session on the shared server, for the tests that run it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.support.images import ALL_HOOKS, image_request, sample_app_uri, wait_image_settled
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess


@pytest.fixture(scope="session")
def sample_uri(moto: MotoServer) -> str:
    return sample_app_uri(moto)


@pytest.fixture(scope="session")
def sample_image(server: ServerProcess, sample_uri: str) -> str:
    """The ARN of a CREATED image of examples/sample-app with every hook enabled, 512 MiB."""
    client = server.client()
    arn = client.create_microvm_image(
        **image_request(
            f"sample-{uuid.uuid4().hex[:8]}",
            sample_uri,
            hooks=ALL_HOOKS,
            resources=[{"minimumMemoryInMiB": 512}],
        )
    )["imageArn"]
    image = wait_image_settled(client, arn)
    assert image["state"] == "CREATED", client.list_microvm_image_builds(
        imageIdentifier=arn, imageVersion="1.0"
    )
    return arn


def run(client: Any, arn: str, **kwargs: Any) -> dict[str, Any]:
    return client.run_microvm(imageIdentifier=arn, **kwargs)
