"""The image state machine of spec §3.1, with builds held in flight: the sample app's ready hook
answers 503 for its first READY_DELAY seconds, so each build stays in its ready stage that long."""

from __future__ import annotations

import uuid
from typing import Any

from tests.support.clients import aws_error
from tests.support.images import image_request, upload, wait_for, wait_image_settled, zip_files
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess

HOLD = {"READY_DELAY": "10"}
READY = {"port": 8080, "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 120}}


def test_the_busy_lock_and_settled_states(server: ServerProcess, sample_uri: str, moto: MotoServer) -> None:
    client = server.client()
    request = image_request(
        f"held-{uuid.uuid4().hex[:6]}", sample_uri, hooks=READY, environmentVariables=HOLD
    )
    created = client.create_microvm_image(**request)
    arn = created["imageArn"]
    assert created["state"] == "CREATING" and created.get("latestActiveImageVersion") is None
    wait_for(
        lambda: (
            client.get_microvm_image_version(imageIdentifier=arn, imageVersion="1.0")["state"]
            == "IN_PROGRESS"
        ),
        30,
        "the build to start",
    )
    del request["name"]
    code, message, status = aws_error(client.update_microvm_image, imageIdentifier=arn, **request)
    assert (code, message, status) == (
        "ConflictException",
        "MicroVM Image is already in state: CREATING",
        409,
    )
    code, message, status = aws_error(client.delete_microvm_image, imageIdentifier=arn)
    assert (code, message, status) == (
        "ValidationException",
        "Cannot delete MicroVM image in its current state: CREATING",
        400,
    )
    code, _, status = aws_error(
        client.update_microvm_image_version, imageIdentifier=arn, imageVersion="1.0", status="INACTIVE"
    )
    assert (code, status) == ("ConflictException", 409)
    code, _, status = aws_error(client.delete_microvm_image_version, imageIdentifier=arn, imageVersion="1.0")
    assert (code, status) == ("ConflictException", 409)
    code, message, status = aws_error(client.run_microvm, imageIdentifier=arn)
    assert (code, message, status) == (
        "ResourceNotFoundException",
        f"No active version found for MicroVM image {arn}",
        404,
    )
    image = wait_image_settled(client, arn)
    assert image["state"] == "CREATED" and image["latestActiveImageVersion"] == "1.0"

    # An update: a new version, the image UPDATING (and locked) until it settles.
    updated = client.update_microvm_image(imageIdentifier=arn, **request)
    assert (updated["imageVersion"], updated["state"]) == ("2.0", "UPDATING")
    assert updated["latestActiveImageVersion"] == "1.0"
    code, message, status = aws_error(client.update_microvm_image, imageIdentifier=arn, **request)
    assert (code, message, status) == (
        "ConflictException",
        "MicroVM Image is already in state: UPDATING",
        409,
    )
    code, message, status = aws_error(client.delete_microvm_image, imageIdentifier=arn)
    assert (code, message, status) == (
        "ValidationException",
        "Cannot delete MicroVM image in its current state: UPDATING",
        400,
    )
    # The active version can still be run while the image updates.
    vm = client.run_microvm(imageIdentifier=arn)
    assert vm["imageVersion"] == "1.0"
    client.terminate_microvm(microvmIdentifier=vm["microvmId"])
    image = wait_image_settled(client, arn)
    assert image["state"] == "UPDATED" and image["latestActiveImageVersion"] == "2.0"

    # A failing update: UPDATE_FAILED, the version FAILED with its build's reason.
    request["codeArtifact"] = {"uri": upload(moto, zip_files({"app.py": "print(1)"}))}  # no Dockerfile
    client.update_microvm_image(imageIdentifier=arn, **request)
    image = wait_image_settled(client, arn)
    assert image["state"] == "UPDATE_FAILED" and image["latestFailedImageVersion"] == "3.0"
    assert image["latestActiveImageVersion"] == "2.0"
    version = client.get_microvm_image_version(imageIdentifier=arn, imageVersion="3.0")
    assert version["stateReason"].startswith("One or more builds failed: ARCHIVE_DOCKERFILE_NOT_FOUND: ")
    # A FAILED version cannot be activated.
    code, message, _ = aws_error(
        client.update_microvm_image_version, imageIdentifier=arn, imageVersion="3.0", status="ACTIVE"
    )
    assert code == "ValidationException" and "is FAILED" in message
    assert client.delete_microvm_image(imageIdentifier=arn)["state"] == "DELETING"


def test_version_quota(make_server: Any) -> None:
    server = make_server({"quotas": {"versions_per_image": 1}})
    client = server.client()
    arn = client.create_microvm_image(**image_request("quota", "file:///nonexistent/app.zip"))["imageArn"]
    wait_image_settled(client, arn)
    request = image_request("ignored", "file:///nonexistent/app.zip")
    del request["name"]
    code, message, status = aws_error(client.update_microvm_image, imageIdentifier=arn, **request)
    assert (code, status) == ("ServiceQuotaExceededException", 402)
    assert "maximum number of versions (1)" in message
