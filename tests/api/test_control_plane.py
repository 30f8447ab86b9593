"""The control plane through boto3: every response is checked against the model (conftest)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import image_request
from tests.support.clients import aws_error
from tests.support.images import MANAGED_BASE, wait_image_settled
from tests.support.server import ServerProcess


def _name(prefix: str = "img") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_managed_images_catalog(client: Any) -> None:
    images = client.list_managed_microvm_images()
    assert [item["imageArn"] for item in images["items"]] == [MANAGED_BASE]
    versions = client.list_managed_microvm_image_versions(imageIdentifier=MANAGED_BASE)["items"]
    assert versions[0]["imageVersion"] == "1" and versions[0]["status"] == "AVAILABLE"
    assert versions[0]["supportedCpuConfigurations"][0]["architecture"] in ("X86_64", "ARM_64")
    code, _message, status = aws_error(
        client.list_managed_microvm_image_versions,
        imageIdentifier="arn:aws:lambda:us-east-1:aws:microvm-image:al2099-9",
    )
    assert (code, status) == ("ResourceNotFoundException", 404)


def test_create_get_list_image_and_its_first_version(client: Any) -> None:
    name = _name()
    created = client.create_microvm_image(
        **image_request(name, description="first", environmentVariables={"MODE": "test"}, tags={"team": "a"})
    )
    arn = created["imageArn"]
    assert arn == f"arn:aws:lambda:us-east-1:000000000000:microvm-image:{name}"
    assert created["imageVersion"] == "1.0"
    assert created["baseImageVersion"] == "1.0"
    assert created["resources"] == [{"minimumMemoryInMiB": 2048}]
    assert created["egressNetworkConnectors"] == [
        "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:INTERNET_EGRESS"
    ]
    assert created["tags"] == {"team": "a"}
    assert created["state"] == "CREATING"

    got = client.get_microvm_image(imageIdentifier=arn)
    assert got["name"] == name and got["tags"] == {"team": "a"}
    assert "baseImageArn" not in got  # the summary projection only

    listed = [item for item in client.list_microvm_images(nameFilter=name)["items"]]
    assert [item["imageArn"] for item in listed] == [arn]

    version = client.get_microvm_image_version(imageIdentifier=arn, imageVersion="1.0")
    assert version["description"] == "first"
    assert version["environmentVariables"] == {"MODE": "test"}
    assert version["status"] in ("ACTIVE", "INACTIVE")
    versions = client.list_microvm_image_versions(imageIdentifier=arn)["items"]
    assert [v["imageVersion"] for v in versions] == ["1.0"]

    builds = client.list_microvm_image_builds(imageIdentifier=arn, imageVersion="1.0")["items"]
    assert len(builds) == 1
    build = client.get_microvm_image_build(
        imageIdentifier=arn, imageVersion="1.0", buildId=builds[0]["buildId"]
    )
    assert build["buildId"] == builds[0]["buildId"]
    none = client.list_microvm_image_builds(
        imageIdentifier=arn, imageVersion="1.0", chipset="GRAVITON", architecture="ARM_64"
    )
    assert none["items"] == []


def test_name_filter_is_a_substring_match(client: Any) -> None:
    marker = uuid.uuid4().hex[:8]
    names = [f"alpha-{marker}", f"beta-{marker}", f"gamma-{marker}x"]
    for name in names:
        client.create_microvm_image(**image_request(name))
    found = {item["name"] for item in client.list_microvm_images(nameFilter=marker)["items"]}
    assert found == set(names)
    assert {item["name"] for item in client.list_microvm_images(nameFilter=f"beta-{marker}")["items"]} == {
        names[1]
    }


def test_pagination_across_pages_and_bad_tokens(server: ServerProcess, client: Any) -> None:
    marker = uuid.uuid4().hex[:8]
    names = {f"page-{marker}-{i}" for i in range(7)}
    for name in sorted(names):
        client.create_microvm_image(**image_request(name))
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        kwargs = {"nameFilter": marker, "maxResults": 3}
        if token:
            kwargs["nextToken"] = token
        page = client.list_microvm_images(**kwargs)
        pages += 1
        seen += [item["name"] for item in page["items"]]
        token = page.get("nextToken")
        if not token:
            break
    assert pages == 3 and len(seen) == 7 and set(seen) == names

    paginator = client.get_paginator("list_microvm_images")
    collected = [
        i["name"]
        for p in paginator.paginate(nameFilter=marker, PaginationConfig={"PageSize": 2})
        for i in p["items"]
    ]
    assert sorted(collected) == sorted(names)

    first = client.list_microvm_images(nameFilter=marker, maxResults=3)
    good = first["nextToken"]
    tampered = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    for bad in (tampered, "garbage", good + "x"):
        code, message, status = aws_error(client.list_microvm_images, nameFilter=marker, nextToken=bad)
        assert (code, status) == ("ValidationException", 400)
        assert "Invalid nextToken" in message
    # A token is bound to its filter and its operation.
    code, _, _ = aws_error(client.list_microvm_images, nameFilter="other", nextToken=good)
    assert code == "ValidationException"
    code, _, _ = aws_error(client.list_microvms, nextToken=good)
    assert code == "ValidationException"
    # ...and to its caller's region.
    west = server.client(region="us-west-2")
    code, _, _ = aws_error(west.list_microvm_images, nameFilter=marker, nextToken=good)
    assert code == "ValidationException"


def test_client_token_idempotency_on_create(client: Any) -> None:
    name = _name("idem")
    token = str(uuid.uuid4())
    first = client.create_microvm_image(**image_request(name), clientToken=token)
    replay = client.create_microvm_image(**image_request(name), clientToken=token)
    first.pop("ResponseMetadata")
    replay.pop("ResponseMetadata")
    assert replay == first  # the original response, verbatim
    assert len(client.list_microvm_images(nameFilter=name)["items"]) == 1
    code, message, status = aws_error(
        client.create_microvm_image, **image_request(name, description="changed"), clientToken=token
    )
    assert (code, message, status) == (
        "ValidationException",
        "The provided clientToken was used with different request parameters.",
        400,
    )


def test_update_checks_the_new_configuration(client: Any) -> None:
    arn = client.create_microvm_image(**image_request(_name("put")))["imageArn"]
    wait_image_settled(client, arn)  # the artifact's bucket does not exist: CREATE_FAILED
    code, message, status = aws_error(
        client.update_microvm_image,
        imageIdentifier=arn,
        baseImageArn=MANAGED_BASE,
        buildRoleArn="arn:aws:iam::123456789012:role/r",
        codeArtifact={"uri": "s3://some-bucket/app.zip"},
        resources=[{"minimumMemoryInMiB": 3000}],
    )
    assert (code, status) == ("ValidationException", 400)
    assert message.startswith("The requested memory size of 3000 MiB is not supported")
    # Nothing was half-written: no version 2.0.
    versions = client.list_microvm_image_versions(imageIdentifier=arn)["items"]
    assert [v["imageVersion"] for v in versions] == ["1.0"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"resources": [{"minimumMemoryInMiB": 32768}]},
            "The requested memory size of 32768 MiB is not supported by base MicroVM image "
            "arn:aws:lambda:us-east-1:aws:microvm-image:al2023-1. Supported memory sizes in MiB are: "
            "[512, 1024, 2048, 4096, 8192].",
        ),
        (
            {"hooks": {"port": 8080, "microvmHooks": {"run": "ENABLED"}}},
            "The ready (/ready) MicroVM image hook must be enabled when any MicroVM lifecycle hook (run, resume, "
            "suspend, or terminate) is enabled. The ready hook signals when the application has finished "
            "initializing so the snapshot is taken in a ready state.",
        ),
        (
            {"hooks": {"microvmImageHooks": {"ready": "ENABLED"}}},
            "Value null at 'hooks.port' failed to satisfy constraint: Member must not be null when a hook is enabled",
        ),
        ({"baseImageArn": "al2023-1"}, "Invalid ARN format: al2023-1"),
        ({"baseImageVersion": "1.0"}, "Base MicroVM image version 1.0 is not available"),
        ({"codeArtifact": {"uri": "https://example.com/app.zip"}}, "at 'codeArtifact.uri' failed to satisfy"),
        ({"egressNetworkConnectors": ["not-an-arn"]}, "Invalid network connector ARN"),
        (
            {
                "egressNetworkConnectors": [
                    "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:HTTP_INGRESS"
                ]
            },
            "is not an egress connector",
        ),
        (
            {"cpuConfigurations": [{"architecture": "X86_64"}, {"architecture": "X86_64"}]},
            "the same architecture more than once",
        ),
    ],
)
def test_create_rules_beyond_the_shapes(client: Any, overrides: dict, message: str) -> None:
    code, text, status = aws_error(client.create_microvm_image, **image_request(_name("rule"), **overrides))
    assert (code, status) == ("ValidationException", 400)
    assert message in text


def test_unknown_base_image_is_not_found(client: Any) -> None:
    code, _message, status = aws_error(
        client.create_microvm_image,
        **image_request(_name(), baseImageArn="arn:aws:lambda:us-east-1:aws:microvm-image:al2099-1"),
    )
    assert (code, status) == ("ResourceNotFoundException", 404)


def test_identifier_rules(client: Any) -> None:
    code, message, _ = aws_error(client.get_microvm_image, imageIdentifier="just-a-name")
    assert (code, message) == ("ValidationException", "Invalid ARN format: just-a-name")
    code, message, _ = aws_error(client.run_microvm, imageIdentifier="just-a-name")
    assert (code, message) == ("ValidationException", "Malformed ARN - doesn't start with 'arn:'")
    arn = "arn:aws:lambda:us-east-1:000000000000:microvm-image:never-made"
    code, message, status = aws_error(client.run_microvm, imageIdentifier=arn)
    assert (code, message, status) == (
        "ResourceNotFoundException",
        f"No active version found for MicroVM image {arn}",
        404,
    )
    code, message, status = aws_error(
        client.get_microvm, microvmIdentifier="microvm-00000000-0000-0000-0000-000000000000"
    )
    assert (code, status) == ("ResourceNotFoundException", 404)
    assert message == "MicroVM not found: microvm-00000000-0000-0000-0000-000000000000"
    for call in (client.suspend_microvm, client.resume_microvm, client.terminate_microvm):
        code, _, status = aws_error(call, microvmIdentifier="microvm-nope")
        assert (code, status) == ("ResourceNotFoundException", 404)


def test_run_parameter_rules_checked_before_anything_else(server: ServerProcess) -> None:
    client = server.client(client_side_validation=False)
    arn = "arn:aws:lambda:us-east-1:000000000000:microvm-image:whatever"
    code, message, _ = aws_error(client.run_microvm, imageIdentifier=arn, runHookPayload="x" * 4097)
    assert code == "ValidationException"
    assert message == (
        "1 validation error detected: Value at 'runHookPayload' failed to satisfy constraint: "
        "Member must have length less than or equal to 4096"
    )
    code, message, _ = aws_error(client.run_microvm, imageIdentifier=arn, maximumDurationInSeconds=28801)
    assert code == "ValidationException"
    assert (
        "at 'maximumDurationInSeconds' failed to satisfy constraint: Member must have value less than or equal to 28800"
        in message
    )


def test_idle_policy_members_are_all_required(server: ServerProcess) -> None:
    import json

    from tests.support.http import raw_request

    response = raw_request(
        server.port,
        "POST",
        "/2025-09-09/microvms",
        json.dumps(
            {
                "imageIdentifier": "arn:aws:lambda:us-east-1:000000000000:microvm-image:x",
                "idlePolicy": {"maxIdleDurationSeconds": 60, "suspendedDurationSeconds": 0},
            }
        ),
        {"Content-Type": "application/json"},
    )
    assert response.json()["message"] == (
        "1 validation error detected: Value null at 'idlePolicy.autoResumeEnabled' failed to satisfy constraint: "
        "Member must not be null"
    )


def test_auth_token_rules(server: ServerProcess) -> None:
    client = server.client(client_side_validation=False)
    code, message, _ = aws_error(
        client.create_microvm_auth_token,
        microvmIdentifier="microvm-x",
        expirationInMinutes=61,
        allowedPorts=[{"port": 8080}],
    )
    assert (code, message) == ("ValidationException", "ExpirationMinutes 61 exceeded max allowed of 60.")
    code, message, _ = aws_error(
        client.create_microvm_auth_token,
        microvmIdentifier="microvm-x",
        expirationInMinutes=5,
        allowedPorts=[],
    )
    assert (
        "at 'allowedPorts' failed to satisfy constraint: Member must have length greater than or equal to 1"
        in message
    )
    code, message, _ = aws_error(
        client.create_microvm_auth_token,
        microvmIdentifier="microvm-x",
        expirationInMinutes=5,
        allowedPorts=[{"port": 1, "allPorts": {}}],
    )
    assert "allowedPorts.1.member" in message and "exactly one" in message
    code, message, status = aws_error(
        client.create_microvm_shell_auth_token, microvmIdentifier="microvm-x", expirationInMinutes=5
    )
    assert (code, status) == ("ResourceNotFoundException", 404)


def test_tags_api(server: ServerProcess) -> None:
    client = server.client(client_side_validation=False)
    arn = client.create_microvm_image(**image_request(_name("tag")))["imageArn"]
    assert client.list_tags(Resource=arn)["Tags"] == {}
    client.tag_resource(Resource=arn, Tags={"a": "1", "b": "2"})
    client.tag_resource(Resource=arn, Tags={"b": "3"})  # merge: overwrite named keys
    assert client.list_tags(Resource=arn)["Tags"] == {"a": "1", "b": "3"}
    client.untag_resource(Resource=arn, TagKeys=["a", "not-there"])
    assert client.list_tags(Resource=arn)["Tags"] == {"b": "3"}
    assert client.get_microvm_image(imageIdentifier=arn)["tags"] == {"b": "3"}
    code, _, status = aws_error(client.tag_resource, Resource=arn, Tags={f"k{i}": "v" for i in range(60)})
    assert (code, status) == ("InvalidParameterValueException", 400)
    code, _, status = aws_error(client.list_tags, Resource="arn:aws:lambda:us-east-1:000000000000:function:f")
    assert (code, status) == ("ResourceNotFoundException", 404)
    code, message, status = aws_error(client.list_tags, Resource="not-an-arn")
    assert (code, status) == ("ValidationException", 400) and "at 'Resource'" in message


def test_regions_are_separate(server: ServerProcess) -> None:
    west = server.client(region="us-west-2")
    east = server.client(region="us-east-1")
    name = _name("west")
    created = west.create_microvm_image(
        **image_request(name, baseImageArn="arn:aws:lambda:us-west-2:aws:microvm-image:al2023-1")
    )
    assert created["imageArn"].startswith("arn:aws:lambda:us-west-2:")
    assert east.list_microvm_images(nameFilter=name)["items"] == []
    code, _, status = aws_error(east.get_microvm_image, imageIdentifier=created["imageArn"])
    assert (code, status) == ("ResourceNotFoundException", 404)
    # The managed base of one region cannot be used from another.
    code, _, _ = aws_error(
        east.create_microvm_image,
        **image_request(_name(), baseImageArn="arn:aws:lambda:us-west-2:aws:microvm-image:al2023-1"),
    )
    assert code == "ResourceNotFoundException"
