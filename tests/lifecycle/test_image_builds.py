"""Image builds through the real server (spec §4): a zip with a Dockerfile becomes a snapshotted,
runnable version; every failure lands in stateReason with the spec's code or wording."""

from __future__ import annotations

import json
import os
import stat
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openmicrovm.wire_model import service_model
from tests.support.clients import AwsCli, aws_error
from tests.support.images import (
    ALL_HOOKS,
    SAMPLE_APP,
    build_failure,
    image_request,
    upload,
    wait_for,
    wait_image_settled,
    zip_files,
)
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess

APP = (SAMPLE_APP / "app.py").read_text()
DOCKERFILE = (SAMPLE_APP / "Dockerfile").read_text()


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _failed_build(client: Any, uri: str, **overrides: Any) -> str:
    arn = client.create_microvm_image(**image_request(_name("bad"), uri, **overrides))["imageArn"]
    image = wait_image_settled(client, arn)
    assert image["state"] == "CREATE_FAILED", image
    version = client.get_microvm_image_version(imageIdentifier=arn, imageVersion="1.0")
    assert version["state"] == "FAILED" and version["status"] == "INACTIVE"
    reason = build_failure(client, arn)
    assert reason in version["stateReason"]
    assert image["latestFailedImageVersion"] == "1.0" and image.get("latestActiveImageVersion") is None
    return reason


def test_sample_app_builds_to_an_active_version(server: ServerProcess, sample_image: str) -> None:
    client = server.client()
    image = client.get_microvm_image(imageIdentifier=sample_image)
    assert image["state"] == "CREATED" and image["latestActiveImageVersion"] == "1.0"
    version = client.get_microvm_image_version(imageIdentifier=sample_image, imageVersion="1.0")
    assert (version["state"], version["status"], version.get("stateReason")) == ("SUCCESSFUL", "ACTIVE", None)
    builds = client.list_microvm_image_builds(imageIdentifier=sample_image, imageVersion="1.0")["items"]
    assert [b["buildState"] for b in builds] == ["SUCCESSFUL"]
    build = client.get_microvm_image_build(
        imageIdentifier=sample_image, imageVersion="1.0", buildId=builds[0]["buildId"]
    )
    sizes = build["snapshotBuild"]
    assert sizes["memorySnapshotSizeInBytes"] >= 0
    assert sizes["codeInstallSizeInBytes"] > 10 * 1024 * 1024  # a Debian root filesystem with python3
    assert sizes["diskSnapshotSizeInBytes"] >= 0


def test_version_summary_field_by_field(server: ServerProcess, sample_image: str) -> None:
    """MicrovmImageVersionSummary (ListMicrovmImageVersions) against the model, member by member."""
    client = server.client(validate=False)
    raw: dict[str, Any] = {}

    def keep(http_response: Any = None, **_: Any) -> None:
        raw["body"] = json.loads(http_response.content)

    client.meta.events.register("after-call.lambda-microvms.ListMicrovmImageVersions", keep)
    client.list_microvm_image_versions(imageIdentifier=sample_image)
    item = raw["body"]["items"][0]
    shape = service_model().shape_for("MicrovmImageVersionSummary")
    assert set(item) == set(shape.members)  # every member present (null when unset), nothing else
    expected = {
        "imageArn": sample_image,
        "imageVersion": "1.0",
        "state": "SUCCESSFUL",
        "status": "ACTIVE",
        "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:al2023-1",
        "baseImageVersion": "1.0",
        "buildRoleArn": "arn:aws:iam::123456789012:role/microvm-build",
        "hooks": ALL_HOOKS,
        "resources": [{"minimumMemoryInMiB": 512}],
        "stateReason": None,
        "description": None,
        "logging": None,
        "cpuConfigurations": None,
        "additionalOsCapabilities": None,
        "environmentVariables": None,
        "kmsKeyIdentifier": None,
        "tags": {},
        "egressNetworkConnectors": [
            "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:INTERNET_EGRESS"
        ],
    }
    for member, value in expected.items():
        assert item[member] == value, member
    assert item["codeArtifact"]["uri"].startswith("s3://")
    assert isinstance(item["createdAt"], float | int) and isinstance(item["updatedAt"], float | int)


def test_update_builds_a_second_version(server: ServerProcess, moto: MotoServer, tmp_path: Path) -> None:
    """The main path through the AWS CLI: create, wait, update, activate/deactivate."""
    client = server.client()
    uri = upload(moto, zip_files({"Dockerfile": DOCKERFILE, "app.py": APP}))
    cli = AwsCli(server, tmp_path)

    name = _name("cli")
    common = [
        "--base-image-arn",
        "arn:aws:lambda:us-east-1:aws:microvm-image:al2023-1",
        "--build-role-arn",
        "arn:aws:iam::123456789012:role/build",
        "--code-artifact",
        f"uri={uri}",
        "--hooks",
        json.dumps({"port": 8080, "microvmImageHooks": {"ready": "ENABLED"}}),
    ]
    arn = cli("create-microvm-image", "--name", name, *common)["imageArn"]
    assert wait_image_settled(client, arn)["state"] == "CREATED"
    updated = cli("update-microvm-image", "--image-identifier", arn, *common, "--description", "v2")
    assert updated["imageVersion"] == "2.0" and updated["state"] == "UPDATING"
    assert updated["latestActiveImageVersion"] == "1.0"
    code, message, status = aws_error(
        client.update_microvm_image_version, imageIdentifier=arn, imageVersion="1.0", status="INACTIVE"
    )
    assert (code, message, status) == (
        "ConflictException",
        "MicroVM Image is already in state: UPDATING",
        409,
    )
    image = wait_image_settled(client, arn)
    assert image["state"] == "UPDATED" and image["latestActiveImageVersion"] == "2.0"
    versions = cli("list-microvm-image-versions", "--image-identifier", arn)["items"]
    assert [(v["imageVersion"], v["state"], v["status"]) for v in versions] == [
        ("1.0", "SUCCESSFUL", "ACTIVE"),
        ("2.0", "SUCCESSFUL", "ACTIVE"),
    ]
    cli(
        "update-microvm-image-version",
        "--image-identifier",
        arn,
        "--image-version",
        "2.0",
        "--status",
        "INACTIVE",
    )
    assert client.get_microvm_image(imageIdentifier=arn)["latestActiveImageVersion"] == "1.0"

    # Deleting a version frees its disk and puts the image in UPDATING while it drains.
    build_dirs = _build_dirs(server, client, arn, "1.0")
    assert all(path.exists() for path in build_dirs)
    deleted = client.delete_microvm_image_version(imageIdentifier=arn, imageVersion="1.0")
    assert deleted["state"] == "DELETING"
    wait_for(lambda: client.get_microvm_image(imageIdentifier=arn)["state"] == "UPDATED", 60, "version drain")
    code, _, status = aws_error(client.get_microvm_image_version, imageIdentifier=arn, imageVersion="1.0")
    assert (code, status) == ("ResourceNotFoundException", 404)
    assert not any(path.exists() for path in build_dirs)
    code, message, status = aws_error(
        client.delete_microvm_image_version, imageIdentifier=arn, imageVersion="2.0"
    )
    assert (code, message, status) == (
        "ValidationException",
        "This is the last version. Please delete the entire image",
        400,
    )

    # Deleting the image frees everything, then the image is gone.
    build_dirs = _build_dirs(server, client, arn, "2.0")
    assert client.delete_microvm_image(imageIdentifier=arn)["state"] == "DELETING"
    assert client.delete_microvm_image(imageIdentifier=arn)["state"] == "DELETING"  # idempotent meanwhile
    wait_for(lambda: not client.list_microvm_images(nameFilter=name)["items"], 60, "image deletion")
    code, _, status = aws_error(client.get_microvm_image, imageIdentifier=arn)
    assert (code, status) == ("ResourceNotFoundException", 404)
    assert not any(path.exists() for path in build_dirs)


def _build_dirs(server: ServerProcess, client: Any, arn: str, version: str) -> list[Path]:
    builds = client.list_microvm_image_builds(imageIdentifier=arn, imageVersion=version)["items"]
    return [server.data_dir / "builds" / build["buildId"] for build in builds]


def test_artifact_failures(server: ServerProcess, moto: MotoServer) -> None:
    client = server.client()
    moto.client("s3").create_bucket(Bucket="exists-but-empty")
    assert _failed_build(client, "s3://exists-but-empty/missing.zip").startswith("S3_NO_SUCH_KEY: ")
    assert _failed_build(client, "s3://no-such-bucket-openmicrovm/app.zip").startswith("S3_NO_SUCH_BUCKET: ")
    assert _failed_build(client, upload(moto, b"this is not a zip")).startswith("ARCHIVE_INVALID: ")
    nested = upload(moto, zip_files({"app/Dockerfile": DOCKERFILE, "app/app.py": APP}))
    assert _failed_build(client, nested).startswith("ARCHIVE_DOCKERFILE_NOT_FOUND: ")
    slip = upload(moto, zip_files({"Dockerfile": DOCKERFILE, "../../escape.txt": "x"}))
    reason = _failed_build(client, slip)
    assert reason.startswith("ARCHIVE_INVALID: ") and "../../escape.txt" in reason


def test_symlink_escape_is_refused(server: ServerProcess, moto: MotoServer, tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("Dockerfile", DOCKERFILE)
        link = zipfile.ZipInfo("passwd")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        handle.writestr(link, "../../../../etc/passwd")
    reason = _failed_build(server.client(), upload(moto, archive.read_bytes()))
    assert reason.startswith("ARCHIVE_INVALID: ") and "passwd" in reason


def test_run_mounts_that_can_name_host_paths_fail_the_version_naming_the_line(
    server: ServerProcess, moto: MotoServer
) -> None:
    """Through the API as a user would deploy it: the CVE-2024-9675 cache mount is refused."""
    dockerfile = (
        "FROM public.ecr.aws/lambda/microvms:al2023-minimal\n"
        "RUN --mount=type=cache,id=../../../../../..,target=/h touch /h/tmp/openmicrovm-escape\n"
    )
    reason = _failed_build(server.client(), upload(moto, zip_files({"Dockerfile": dockerfile})))
    assert reason.startswith("CONTAINER_BUILD_FAILED: The container image build failed.")
    assert "Line 2 of the Dockerfile" in reason and "CVE-2024-9675" in reason
    assert not Path("/tmp/openmicrovm-escape").exists()


def test_failing_run_step(server: ServerProcess, moto: MotoServer) -> None:
    dockerfile = "FROM public.ecr.aws/lambda/microvms:al2023-minimal\nRUN echo about-to-fail && exit 3\n"
    reason = _failed_build(server.client(), upload(moto, zip_files({"Dockerfile": dockerfile})))
    assert reason.startswith("CONTAINER_BUILD_FAILED: The container image build failed.")
    assert "about-to-fail" in reason


def test_ready_hook_failures(server: ServerProcess, moto: MotoServer) -> None:
    client = server.client()
    uri = upload(moto, zip_files({"Dockerfile": DOCKERFILE, "app.py": APP}))
    hooks = {"port": 8080, "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 3}}
    failing = _failed_build(client, uri, hooks=hooks, environmentVariables={"READY_STATUS": "500"})
    assert failing == "Ready hook check failed: the application returned a server error (HTTP 5xx) response"
    client_error = _failed_build(client, uri, hooks=hooks, environmentVariables={"READY_STATUS": "404"})
    assert (
        client_error == "Ready hook check failed: the application returned a client error (HTTP 4xx) response"
    )
    hanging = _failed_build(client, uri, hooks=hooks, environmentVariables={"READY_DELAY": "3600"})
    assert "timed out" in hanging.lower() or "timeout" in hanging.lower()


def test_an_architecture_the_host_cannot_run_fails(server: ServerProcess, moto: MotoServer) -> None:
    client = server.client()
    uri = upload(moto, zip_files({"Dockerfile": DOCKERFILE, "app.py": APP}))
    host = "X86_64" if os.uname().machine == "x86_64" else "ARM_64"
    other = "ARM_64" if host == "X86_64" else "X86_64"
    reason = _failed_build(client, uri, cpuConfigurations=[{"architecture": other}])
    assert other in reason


def test_a_restart_during_a_build_never_leaves_it_in_progress(
    make_server: Callable[..., ServerProcess], moto: MotoServer
) -> None:
    server = make_server()
    client = server.client()
    uri = upload(moto, zip_files({"Dockerfile": DOCKERFILE, "app.py": APP}))
    arn = client.create_microvm_image(**image_request("restart", uri))["imageArn"]
    wait_for(
        lambda: (
            client.list_microvm_image_builds(imageIdentifier=arn, imageVersion="1.0")["items"][0][
                "buildState"
            ]
            == "IN_PROGRESS"
        ),
        60,
        "the build to start",
    )
    server.kill()  # SIGKILL, in the middle of the build
    server.start()
    client = server.client()
    image = wait_image_settled(client, arn)
    assert image["state"] in ("CREATED", "CREATE_FAILED")
    builds = client.list_microvm_image_builds(imageIdentifier=arn, imageVersion="1.0")["items"]
    assert builds[0]["buildState"] in ("SUCCESSFUL", "FAILED")


def test_a_build_past_the_servers_time_limit_fails(
    make_server: Callable[..., ServerProcess], moto: MotoServer
) -> None:
    server = make_server({"max_dockerfile_build_seconds": 3})
    dockerfile = "FROM public.ecr.aws/lambda/microvms:al2023-minimal\nRUN echo started && sleep 600\n"
    reason = _failed_build(server.client(), upload(moto, zip_files({"Dockerfile": dockerfile})))
    assert reason.startswith("CONTAINER_BUILD_FAILED: The container image build failed.")
    assert "ran longer than the limit of 3 seconds (the server's max_dockerfile_build_seconds)" in reason


def test_file_artifacts_only_from_the_allowed_directories(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    # An empty artifact_file_roots: the server's default, <data dir>/artifacts (where `deploy` puts zips).
    server = make_server({"artifact_file_roots": []})
    client = server.client()
    no_dockerfile = zip_files({"app.py": APP})
    allowed = server.data_dir / "artifacts"
    allowed.mkdir()
    (allowed / "app.zip").write_bytes(no_dockerfile)
    # Read (so its content decides): the build gets as far as looking for the Dockerfile.
    inside = _failed_build(client, (allowed / "app.zip").as_uri())
    assert inside.startswith("ARCHIVE_DOCKERFILE_NOT_FOUND: "), inside
    outside = tmp_path / "outside.zip"
    outside.write_bytes(no_dockerfile)
    (allowed / "link.zip").symlink_to(outside)
    for uri in [outside.as_uri(), "file:///etc/passwd", (allowed / "link.zip").as_uri()]:
        reason = _failed_build(client, uri)
        assert reason.startswith("S3_ACCESS_DENIED: ") and "artifact_file_roots" in reason, reason
    # UpdateMicrovmImage builds from its artifact the same way.
    arn = client.create_microvm_image(**image_request(_name("update"), (allowed / "app.zip").as_uri()))[
        "imageArn"
    ]
    wait_image_settled(client, arn)
    update = image_request("ignored", "file:///etc/shadow")
    del update["name"]
    client.update_microvm_image(imageIdentifier=arn, **update)
    wait_image_settled(client, arn)
    assert build_failure(client, arn, "2.0").startswith("S3_ACCESS_DENIED: ")
