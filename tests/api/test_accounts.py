"""Accounts (from access keys), SigV4 when keys are configured, quotas, and restart persistence."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.conftest import image_request
from tests.support.clients import AwsCli, aws_error
from tests.support.http import raw_request
from tests.support.server import ServerProcess

ALICE = {"access_key_id": "AKIDALICE", "secret_access_key": "alice-secret", "account_id": "111111111111"}
BOB = {"access_key_id": "AKIDBOB", "secret_access_key": "bob-secret", "account_id": "222222222222"}


@pytest.fixture
def two_accounts(make_server: Callable[..., ServerProcess]) -> ServerProcess:
    return make_server({"access_keys": [ALICE, BOB]})


def test_accounts_never_see_each_other(two_accounts: ServerProcess) -> None:
    alice = two_accounts.client(key=ALICE["access_key_id"], secret=ALICE["secret_access_key"])
    bob = two_accounts.client(key=BOB["access_key_id"], secret=BOB["secret_access_key"])
    arn = alice.create_microvm_image(**image_request("shared-name"))["imageArn"]
    assert ":111111111111:" in arn
    # The same name is free in another account.
    assert ":222222222222:" in bob.create_microvm_image(**image_request("shared-name"))["imageArn"]
    assert [i["imageArn"] for i in bob.list_microvm_images()["items"]] == [
        arn.replace("111111111111", "222222222222")
    ]
    for call, kwargs in [
        (bob.get_microvm_image, {"imageIdentifier": arn}),
        (bob.list_microvm_image_versions, {"imageIdentifier": arn}),
        (bob.get_microvm_image_version, {"imageIdentifier": arn, "imageVersion": "1.0"}),
        (bob.list_microvm_image_builds, {"imageIdentifier": arn, "imageVersion": "1.0"}),
        (bob.delete_microvm_image, {"imageIdentifier": arn}),
        (bob.list_tags, {"Resource": arn}),
        (bob.tag_resource, {"Resource": arn, "Tags": {"x": "y"}}),
        (bob.run_microvm, {"imageIdentifier": arn}),
        (bob.list_microvms, {"imageIdentifier": arn}),
    ]:
        code, _, status = aws_error(call, **kwargs)
        assert (code, status) == ("AccessDeniedException", 403), call
    assert alice.list_tags(Resource=arn)["Tags"] == {}
    assert alice.get_microvm_image(imageIdentifier=arn)["state"] != "DELETING"


def test_signatures_are_checked_when_keys_are_configured(two_accounts: ServerProcess) -> None:
    wrong_secret = two_accounts.client(key=ALICE["access_key_id"], secret="not-the-secret")
    code, message, status = aws_error(wrong_secret.list_microvm_images)
    assert (code, status) == ("InvalidSignatureException", 403)
    assert "signature we calculated does not match" in message
    unknown = two_accounts.client(key="AKIDNOBODY", secret="x")
    code, _, status = aws_error(unknown.list_microvm_images)
    assert (code, status) == ("UnrecognizedClientException", 403)
    unsigned = raw_request(two_accounts.port, "GET", "/2025-09-09/microvm-images")
    assert unsigned.status == 403 and unsigned.error_type == "MissingAuthenticationTokenException"
    # A body changed after signing no longer matches its signature.
    alice = two_accounts.client(key=ALICE["access_key_id"], secret=ALICE["secret_access_key"], validate=False)

    def tamper(request: Any, **_: Any) -> None:
        request.body = request.body.replace(b"tampered-a", b"tampered-b")

    alice.meta.events.register_last("before-send.lambda-microvms.CreateMicrovmImage", tamper)
    code, _, status = aws_error(alice.create_microvm_image, **image_request("tampered-a"))
    assert (code, status) == ("InvalidSignatureException", 403)


def test_presigned_requests_are_accepted(two_accounts: ServerProcess) -> None:
    url = f"{two_accounts.url}/2025-09-09/managed-microvm-images"
    request = AWSRequest(method="GET", url=url)
    SigV4QueryAuth(
        Credentials(BOB["access_key_id"], BOB["secret_access_key"]), "lambda", "us-east-1"
    ).add_auth(request)
    path = request.url[len(two_accounts.url) :]
    response = raw_request(two_accounts.port, "GET", path)
    assert response.status == 200, response.body
    forged = path.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert raw_request(two_accounts.port, "GET", forged).status == 403


def test_any_key_maps_to_the_default_account_when_none_are_configured(server: ServerProcess) -> None:
    name = f"anykey-{uuid.uuid4().hex[:8]}"
    first = server.client(key="AKIDONE", secret="one")
    second = server.client(key="AKIDTWO", secret="two")
    arn = first.create_microvm_image(**image_request(name))["imageArn"]
    assert ":000000000000:" in arn
    assert second.get_microvm_image(imageIdentifier=arn)["name"] == name


def test_quotas_answer_402(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server({"quotas": {"images": 2}})
    client = server.client()
    client.create_microvm_image(**image_request("q1"))
    client.create_microvm_image(**image_request("q2"))
    code, message, status = aws_error(client.create_microvm_image, **image_request("q3"))
    assert (code, status) == ("ServiceQuotaExceededException", 402)
    assert "maximum number of MicroVM images (2)" in message
    assert client.list_microvm_images()["items"][-1]["name"] == "q2"  # nothing half-written


def test_state_survives_a_restart(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server()
    client = server.client()
    created = client.create_microvm_image(**image_request("durable", tags={"k": "v"}), clientToken="tok-1")
    server.restart()
    client = server.client()
    got = client.get_microvm_image(imageIdentifier=created["imageArn"])
    assert got["name"] == "durable" and got["tags"] == {"k": "v"}
    assert (
        client.get_microvm_image_version(imageIdentifier=created["imageArn"], imageVersion="1.0")[
            "imageVersion"
        ]
        == "1.0"
    )
    # The clientToken is remembered across the restart too.
    replay = client.create_microvm_image(**image_request("durable", tags={"k": "v"}), clientToken="tok-1")
    assert replay["imageArn"] == created["imageArn"] and replay["createdAt"] == created["createdAt"]
    # ...and so are nextTokens (the signing secret lives in the data dir).
    for name in ("durable-2", "durable-3"):
        client.create_microvm_image(**image_request(name))
    token = client.list_microvm_images(maxResults=1)["nextToken"]
    server.restart()
    assert server.client().list_microvm_images(maxResults=1, nextToken=token)["items"]


def test_aws_cli_speaks_to_the_server(server: ServerProcess, tmp_path: Any) -> None:
    run = AwsCli(server, tmp_path).run

    managed = run("list-managed-microvm-images")
    assert managed.returncode == 0, managed.stderr
    assert json.loads(managed.stdout)["items"][0]["imageArn"].endswith(":aws:microvm-image:al2023-1")
    name = f"cli-{uuid.uuid4().hex[:8]}"
    created = run(
        "create-microvm-image",
        "--name",
        name,
        "--base-image-arn",
        "arn:aws:lambda:us-east-1:aws:microvm-image:al2023-1",
        "--build-role-arn",
        "arn:aws:iam::123456789012:role/build",
        "--code-artifact",
        "uri=s3://no-such-bucket-openmicrovm/app.zip",
    )
    assert created.returncode == 0, created.stderr
    arn = json.loads(created.stdout)["imageArn"]
    got = run("get-microvm-image", "--image-identifier", arn)
    assert json.loads(got.stdout)["name"] == name
    listed = run("list-microvm-images", "--name-filter", name)
    assert [i["imageArn"] for i in json.loads(listed.stdout)["items"]] == [arn]
    bad = run("get-microvm-image", "--image-identifier", name)
    assert bad.returncode != 0
    assert "ValidationException" in bad.stderr and f"Invalid ARN format: {name}" in bad.stderr
    missing = run("get-microvm", "--microvm-identifier", "microvm-none")
    assert missing.returncode != 0 and "MicroVM not found: microvm-none" in missing.stderr
