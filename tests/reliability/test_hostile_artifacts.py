"""Hostile code artifacts against the real builder: zip bombs (honest and lying), too many files,
zip-slip, symlink and hard-link escapes, device files, Dockerfiles that reach outside their
context or are huge, and RUN steps that reach for the host (mount, /proc/sys, ptrace, mknod,
signals, the control plane, the filesystem outside their chroot). Each build must fail or be
contained, and the host must be unchanged: the sentinel file and process these tests plant stay
as they were, nothing appears where an escape would have written, and the data dir keeps nothing.

RUN steps run as root under buildah's chroot isolation without CAP_SYS_CHROOT, in PID, mount and
network namespaces of the build's own (the network reaches the outside world but nothing on the
host, see builder/build_network.py): the probe records what they manage to do, and none of it may
reach the host."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import MAX_ARTIFACT_BYTES, MAX_ARTIFACT_FILES
from tests.reliability.hostile import (
    MIB,
    Artifact,
    context_escape_artifacts,
    escaping_artifacts,
    huge_dockerfile,
    long_name_artifact,
    lying_zip_bomb,
    many_files,
    probe_artifact,
    probe_results,
    ssrf_artifact,
    zip_bomb,
)
from tests.reliability.invariants import read_snapshot, settled_violations
from tests.support.images import image_request, upload, wait_image_settled
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess

SENTINEL_TEXT = "untouched"


@dataclass
class Built:
    arn: str
    state: str
    reason: str | None
    log: str
    build_ids: list[str]


@dataclass
class Host:
    """What the tests planted on the host to see whether a build touched it: a file and a process
    no build may touch, and a second pair that only the RUN probe aims at (so that what the probe
    manages does not hide what the other builds did)."""

    directory: Path
    sentinel: Path
    victim: subprocess.Popen[bytes]
    probe_target: Path
    probe_victim: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    directory = Path(tempfile.mkdtemp(prefix="omv-hostile-"))
    planted = Host(
        directory,
        directory / "sentinel",
        subprocess.Popen(["sleep", "900"]),
        directory / "probe-target",
        subprocess.Popen(["sleep", "900"]),
    )
    planted.sentinel.write_text(SENTINEL_TEXT)
    planted.probe_target.write_text(SENTINEL_TEXT)
    try:
        yield planted
    finally:
        for victim in (planted.victim, planted.probe_victim):
            if victim.poll() is None:
                victim.send_signal(signal.SIGKILL)
            victim.wait()
        for path in sorted(directory.rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() or path.is_symlink() else path.rmdir()
        directory.rmdir()


def _build_log(server: ServerProcess, client: Any, arn: str) -> str:
    builds = client.list_microvm_image_builds(imageIdentifier=arn, imageVersion="1.0")["items"]
    logs = server.data_dir / "logs" / "builds"
    return "".join(
        path.read_text(errors="replace")
        for build in builds
        for path in sorted(logs.glob(f"{build['buildId']}*"))
    )


@pytest.fixture(scope="module")
def built(hostile_server: ServerProcess, moto: MotoServer, host: Host) -> dict[str, Built]:
    """Every hostile artifact, created at once (the builder takes them in turn), then settled."""
    assert hostile_server.process is not None
    artifacts: list[Artifact] = [
        *escaping_artifacts(str(host.directory)),
        long_name_artifact(),
        *context_escape_artifacts(),
        Artifact("zip bomb", zip_bomb(4 * MAX_ARTIFACT_BYTES)),
        Artifact("lying zip bomb", lying_zip_bomb(4 * MAX_ARTIFACT_BYTES)),
        Artifact("too many files", many_files(MAX_ARTIFACT_FILES + 500)),
        Artifact("huge Dockerfile", huge_dockerfile(4 * MIB)),
        Artifact("ADD from the host's loopback", ssrf_artifact(hostile_server.port)),
        Artifact(
            "RUN probe",
            probe_artifact(
                str(host.probe_target), host.probe_victim.pid, hostile_server.port, hostile_server.process.pid
            ),
        ),
    ]
    client = hostile_server.client()
    arns = {}
    for artifact in artifacts:
        name = f"hostile-{uuid.uuid4().hex[:8]}"
        arns[artifact.name] = client.create_microvm_image(**image_request(name, upload(moto, artifact.data)))[
            "imageArn"
        ]
    results = {}
    for name, arn in arns.items():
        image = wait_image_settled(client, arn, timeout=300)
        version = client.get_microvm_image_version(imageIdentifier=arn, imageVersion="1.0")
        builds = client.list_microvm_image_builds(imageIdentifier=arn, imageVersion="1.0")["items"]
        results[name] = Built(
            arn,
            image["state"],
            version["stateReason"],
            _build_log(hostile_server, client, arn),
            [build["buildId"] for build in builds],
        )
    return results


def _host_unchanged(host: Host) -> None:
    assert host.sentinel.read_text() == SENTINEL_TEXT
    assert host.victim.poll() is None, "the sentinel process was killed"


@pytest.mark.parametrize("name", [a.name for a in escaping_artifacts("/x")])
def test_escaping_zips_fail_and_write_nothing_outside(built: dict[str, Built], host: Host, name: str) -> None:
    result = built[name]
    assert result.state == "CREATE_FAILED", result
    assert result.reason and result.reason.split(":")[0] in ("One or more builds failed",), result.reason
    reason = result.reason.removeprefix("One or more builds failed: ")
    assert reason.startswith(("ARCHIVE_INVALID", "ARCHIVE_DOCKERFILE_NOT_FOUND")), reason
    assert sorted(p.name for p in host.directory.iterdir()) == ["probe-target", "sentinel"]
    _host_unchanged(host)
    for artifact in escaping_artifacts(str(host.directory)):
        for target in artifact.targets:
            assert not os.path.lexists(target), target


def test_an_overlong_entry_name_is_an_invalid_archive(built: dict[str, Built]) -> None:
    reason = built["very long name"].reason or ""
    assert "ARCHIVE_INVALID" in reason and "/work/" not in reason, reason[:300]


@pytest.mark.parametrize("name", ["zip bomb", "lying zip bomb", "too many files"])
def test_bombs_stop_at_the_configured_limits(built: dict[str, Built], name: str) -> None:
    result = built[name]
    assert result.state == "CREATE_FAILED", result
    assert result.reason and "ARCHIVE_INVALID" in result.reason, result.reason


def test_failed_builds_leave_nothing_in_the_data_dir(
    built: dict[str, Built], hostile_server: ServerProcess
) -> None:
    for name, result in built.items():
        for build_id in result.build_ids:
            assert not (hostile_server.data_dir / "builds" / build_id).exists(), name
            assert not (hostile_server.data_dir / "work" / build_id).exists(), name
            assert not (hostile_server.data_dir / "sandboxes" / "sandboxes" / f"build-{build_id}").exists(), (
                name
            )


@pytest.mark.parametrize("name", [a.name for a in context_escape_artifacts()])
def test_dockerfiles_cannot_reach_outside_their_context(
    built: dict[str, Built], host: Host, name: str
) -> None:
    result = built[name]
    assert result.state == "CREATE_FAILED", result
    assert "CONTAINER_BUILD_FAILED" in (result.reason or ""), result.reason
    assert "root:" not in result.log  # nothing of /etc/shadow or /etc/passwd made it into the log
    _host_unchanged(host)


def test_a_huge_dockerfile_is_built_or_refused_and_the_server_stays_up(
    built: dict[str, Built], hostile_server: ServerProcess
) -> None:
    result = built["huge Dockerfile"]
    # It has no CMD, so it cannot start: a clear failure after (or instead of) the container build.
    assert result.state == "CREATE_FAILED" and result.reason, result
    assert hostile_server.client().list_managed_microvm_images()["items"]


def test_add_cannot_fetch_from_the_hosts_loopback(built: dict[str, Built]) -> None:
    result = built["ADD from the host's loopback"]
    assert 'LEAKED {"nextToken"' not in result.log, result.log[-600:]


@pytest.fixture(scope="module")
def probe(built: dict[str, Built]) -> dict[str, dict[str, object]]:
    result = built["RUN probe"]
    found = probe_results(result.log)
    assert len(found) == 8, result.log[-2000:]
    return found


@pytest.mark.parametrize("attempt", ["mount", "write /proc/sys", "ptrace the server", "mknod a block device"])
def test_a_run_step_is_refused_privileged_operations(
    probe: dict[str, dict[str, object]], attempt: str
) -> None:
    assert probe[attempt]["ok"] is False, probe[attempt]


def test_a_run_step_cannot_escape_its_chroot(probe: dict[str, dict[str, object]], host: Host) -> None:
    assert host.probe_target.read_text() == SENTINEL_TEXT, probe["escape the chroot and write a host file"]


def test_a_run_step_cannot_signal_host_processes(probe: dict[str, dict[str, object]], host: Host) -> None:
    assert probe["see host processes"]["ok"] is False
    assert host.probe_victim.poll() is None, probe["signal a host process"]


def test_a_run_step_cannot_reach_the_control_plane(probe: dict[str, dict[str, object]]) -> None:
    assert probe["call the control plane"]["ok"] is False, probe["call the control plane"]


def test_the_server_survived_the_hostile_builds(
    built: dict[str, Built], hostile_server: ServerProcess
) -> None:
    assert hostile_server.process is not None and hostile_server.process.poll() is None
    snapshot = read_snapshot(hostile_server.data_dir)
    hostile = {result.arn for result in built.values()}
    assert all(image["state"] == "CREATE_FAILED" for image in snapshot.images if image["arn"] in hostile)
    problems = [
        p
        for p in settled_violations(hostile_server.data_dir, frozenset({hostile_server.process.pid}))
        if not p.startswith("still transitional")  # other tests of the package may be building or running
    ]
    assert problems == []
