"""The everyday verbs end to end: deploy the sample app, follow its build log, run it, list it,
suspend, resume and terminate it, redeploy from S3, and see a failed build explained."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cli.helpers import (
    BUILD_TIMEOUT,
    REPO,
    SAMPLE_APP,
    SAMPLE_HOOKS,
    cli,
    cli_environment,
    cli_json,
    command,
    deploy_sample,
    terminate_all,
)
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess


@dataclass
class Deployment:
    name: str
    image_arn: str
    build_id: str
    returncode: int
    stdout: str
    stderr: str
    # Each line `logs --follow` printed, with the version's state just after it was read.
    followed: list[tuple[str, str]] = field(default_factory=list)
    follow_returncode: int | None = None


def _wait_for_build(client: Any, name: str, deadline: float) -> tuple[str, str]:
    while time.monotonic() < deadline:
        images = [
            item for item in client.list_microvm_images(nameFilter=name)["items"] if item["name"] == name
        ]
        if images:
            arn = images[0]["imageArn"]
            builds = client.list_microvm_image_builds(imageIdentifier=arn, imageVersion="1.0")["items"]
            if builds:
                return arn, builds[0]["buildId"]
        time.sleep(0.1)
    raise AssertionError(f"no build of {name} appeared")


@pytest.fixture(scope="module")
def deployment(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """`deploy` of the sample app, with `logs --follow` on its build from another process."""
    folder = tmp_path_factory.mktemp("cli-deploy")
    name = f"sample-{uuid.uuid4().hex[:8]}"
    env = cli_environment(server.url, folder)
    out, err = folder / "deploy.out", folder / "deploy.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        deploy = subprocess.Popen(
            command("deploy", str(SAMPLE_APP), "--name", name, "--hooks", json.dumps(SAMPLE_HOOKS)),
            env=env,
            cwd=REPO,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
    follow: subprocess.Popen[str] | None = None
    watchdog = threading.Timer(BUILD_TIMEOUT, lambda: [p.kill() for p in (deploy, follow) if p is not None])
    watchdog.start()
    try:
        client = server.client()
        arn, build_id = _wait_for_build(client, name, time.monotonic() + 60)
        follow = subprocess.Popen(
            command("logs", build_id, "--follow"),
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        result = Deployment(name, arn, build_id, 0, "", "")
        assert follow.stdout is not None
        for line in follow.stdout:
            state = client.get_microvm_image_version(imageIdentifier=arn, imageVersion="1.0")["state"]
            result.followed.append((line.rstrip("\n"), state))
        result.follow_returncode = follow.wait()
        result.returncode = deploy.wait()
        result.stdout, result.stderr = out.read_text(), err.read_text()
        yield result
    finally:
        watchdog.cancel()
        for process in (deploy, follow):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_deploy_builds_the_image_and_shows_the_build(deployment: Deployment) -> None:
    assert deployment.returncode == 0, deployment.stderr
    assert f"deployed {deployment.name} version 1.0 (CREATED)" in deployment.stdout
    assert deployment.image_arn in deployment.stdout
    # The build log went by on stderr while it happened.
    assert f"build {deployment.build_id} of {deployment.image_arn} version 1.0" in deployment.stderr
    assert "build succeeded" in deployment.stderr


def test_logs_follow_shows_the_build_steps_as_they_happen(deployment: Deployment) -> None:
    assert deployment.follow_returncode == 0
    lines = [line for line, _ in deployment.followed]
    assert any(f"build {deployment.build_id} of" in line for line in lines)
    assert any(" stage: " in line for line in lines)
    assert lines[-1].endswith(" build succeeded")
    # Lines arrived while the build was still going, not all at the end.
    assert any(state in ("PENDING", "IN_PROGRESS") for _, state in deployment.followed)
    assert deployment.followed[-1][1] == "SUCCESSFUL"


def test_images_and_versions_list_the_deployment(
    server: ServerProcess, deployment: Deployment, tmp_path: Path
) -> None:
    images = cli_json(server.url, tmp_path, "images")
    mine = [image for image in images if image["name"] == deployment.name]
    assert mine and mine[0]["state"] == "CREATED" and mine[0]["latestActiveImageVersion"] == "1.0"
    table = cli(server.url, tmp_path, "versions", deployment.name)
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:3] == ["VERSION", "STATE", "STATUS"]
    assert table.stdout.splitlines()[1].split()[:3] == ["1.0", "SUCCESSFUL", "ACTIVE"]
    by_arn = cli_json(server.url, tmp_path, "versions", deployment.image_arn)
    assert [version["imageVersion"] for version in by_arn] == ["1.0"]
    assert by_arn[0]["hooks"]["port"] == 8080


@pytest.fixture
def microvms(server: ServerProcess) -> Iterator[list[str]]:
    """The ids of the MicroVMs a test starts; whatever is still alive at its end is terminated."""
    started: list[str] = []
    yield started
    terminate_all(server.client(), started)


def test_run_ps_suspend_resume_terminate(
    server: ServerProcess, deployment: Deployment, tmp_path: Path, microvms: list[str]
) -> None:
    client = server.client()
    run = cli(server.url, tmp_path, "run", deployment.name, "--payload", "from the cli", "--shell")
    assert run.returncode == 0, run.stderr
    microvm_id, state = run.stdout.splitlines()[0].split()
    microvms.append(microvm_id)
    assert state == "RUNNING" and microvm_id.startswith("microvm-")
    assert "endpoint" in run.stdout and ".lambda-microvm.us-east-1.localhost" in run.stdout
    details = client.get_microvm(microvmIdentifier=microvm_id)
    assert details["state"] == "RUNNING"
    assert any(arn.endswith(":SHELL_INGRESS") for arn in details["ingressNetworkConnectors"])

    listed = cli_json(server.url, tmp_path, "ps")
    assert {"microvmId": microvm_id, "state": "RUNNING"}.items() <= next(
        item for item in listed if item["microvmId"] == microvm_id
    ).items()
    table = cli(server.url, tmp_path, "ps", "--image", deployment.name)
    assert any(line.split()[:2] == [microvm_id, "RUNNING"] for line in table.stdout.splitlines())

    suspended = cli_json(server.url, tmp_path, "suspend", microvm_id)
    assert suspended["state"] == "SUSPENDED"
    assert client.get_microvm(microvmIdentifier=microvm_id)["state"] == "SUSPENDED"
    resumed = cli(server.url, tmp_path, "resume", microvm_id)
    assert resumed.returncode == 0 and resumed.stdout.split() == [microvm_id, "RUNNING"]
    assert client.get_microvm(microvmIdentifier=microvm_id)["state"] == "RUNNING"
    terminated = cli(server.url, tmp_path, "terminate", microvm_id)
    assert terminated.returncode == 0 and terminated.stdout.split() == [microvm_id, "TERMINATED"]

    assert microvm_id not in cli(server.url, tmp_path, "ps").stdout
    everything = cli_json(server.url, tmp_path, "ps", "--all")
    assert next(item for item in everything if item["microvmId"] == microvm_id)["state"] == "TERMINATED"
    again = cli(server.url, tmp_path, "suspend", microvm_id)
    assert again.returncode == 1 and "ValidationException" in again.stderr and "terminated" in again.stderr

    log = cli(server.url, tmp_path, "logs", microvm_id)
    assert log.returncode == 0
    states = [line.split(" state: ", 1)[1] for line in log.stdout.splitlines() if " state: " in line]
    assert states == ["RUNNING", "SUSPENDED", "RUNNING", "TERMINATED"]
    as_json = [
        json.loads(line)
        for line in cli(server.url, tmp_path, "logs", microvm_id, "--output", "json").stdout.splitlines()
    ]
    assert [entry["message"] for entry in as_json if entry["message"].startswith("state: ")][
        -1
    ] == "state: TERMINATED"
    assert all(isinstance(entry["timestamp"], float) for entry in as_json)


def test_redeploy_from_s3_keeps_the_configuration(
    server: ServerProcess, deployment: Deployment, moto: MotoServer, tmp_path: Path
) -> None:
    bucket = f"artifacts-{uuid.uuid4().hex[:8]}"
    moto.client("s3").create_bucket(Bucket=bucket)
    result = cli(
        server.url,
        tmp_path,
        "deploy",
        str(SAMPLE_APP),
        "--name",
        deployment.name,
        "--bucket",
        bucket,
        "--output",
        "json",
        extra_env=moto.environment(),
        timeout=BUILD_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["imageVersion"] == "2.0" and report["imageState"] == "UPDATED"
    assert report["versionState"] == "SUCCESSFUL"
    assert report["codeArtifact"]["uri"].startswith(f"s3://{bucket}/openmicrovm/{deployment.name}/")
    version = server.client().get_microvm_image_version(
        imageIdentifier=deployment.image_arn, imageVersion="2.0"
    )
    assert (
        version["hooks"]
        == server.client().get_microvm_image_version(
            imageIdentifier=deployment.image_arn, imageVersion="1.0"
        )["hooks"]
    )


def test_a_failed_build_is_explained(server: ServerProcess, tmp_path: Path) -> None:
    name = f"failing-{uuid.uuid4().hex[:8]}"
    result = deploy_sample(server.url, tmp_path, name, "--env", "READY_STATUS=500")
    assert result.returncode == 1
    assert f"the build of {name} version 1.0 failed" in result.stderr
    assert "Ready hook check failed" in result.stderr
    assert "Traceback" not in result.stderr
