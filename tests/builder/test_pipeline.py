"""The whole build pipeline with real sandboxes: sample app, hooks, failures, cancellation, cleanup."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from openmicrovm.builder.buildah import BuildahStore
from openmicrovm.builder.errors import (
    APPLICATION_START_FAILED,
    ARCHITECTURE_NOT_SUPPORTED,
    READY_HOOK_FAILED,
    READY_HOOK_TIMEOUT,
    S3_NO_SUCH_KEY,
    VALIDATE_HOOK_FAILED,
    BuildFailed,
)
from openmicrovm.builder.pipeline import STAGES, BuildRequest, BuildResult, run_build
from openmicrovm.runtime.driver import SandboxDriver
from tests.builder.conftest import assert_store_clean
from tests.builder.zips import directory_zip, file, write_zip
from tests.support.images import SAMPLE_APP

runtime = pytest.importorskip("openmicrovm.runtime")
if not hasattr(runtime, "make_driver"):
    pytest.skip("the sandbox runtime is not available yet", allow_module_level=True)

IMAGE_ARN = "arn:aws:lambda:us-east-1:123456789012:microvm-image:sample-app"
BOTH_HOOKS = {
    "port": 8080,
    "microvmImageHooks": {
        "ready": "ENABLED",
        "readyTimeoutInSeconds": 30,
        "validate": "ENABLED",
        "validateTimeoutInSeconds": 30,
    },
}


def hooks(ready_timeout: int = 30, validate: bool = False) -> dict[str, Any]:
    return {
        "port": 8080,
        "microvmImageHooks": {
            "ready": "ENABLED",
            "readyTimeoutInSeconds": ready_timeout,
            "validate": "ENABLED" if validate else "DISABLED",
        },
    }


@pytest.fixture
def driver(tmp_path: Path, builder_cache: Path, store: BuildahStore) -> Iterator[SandboxDriver]:
    name = "auto"
    made = runtime.make_driver(name, tmp_path / "sandboxes", builder_cache)
    yield made
    strays = asyncio.run(made.cleanup_strays(set()))
    assert strays == [], f"sandboxes left behind: {strays}"
    assert_store_clean(store)


@pytest.fixture(scope="module")
def sample_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return directory_zip(tmp_path_factory.mktemp("sample") / "sample-app.zip", SAMPLE_APP)


@dataclass
class Outcome:
    request: BuildRequest
    result: BuildResult | None = None
    failure: BuildFailed | None = None
    log: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.log)


def make_request(tmp_path: Path, cache: Path, uri: str, **overrides: Any) -> BuildRequest:
    build_id = str(uuid.uuid4())
    options: dict[str, Any] = {
        "build_id": build_id,
        "image_arn": IMAGE_ARN,
        "image_name": "sample-app",
        "image_version": "1.0",
        "region": "us-east-1",
        "architecture": "X86_64",
        "code_uri": uri,
        "work_dir": tmp_path / "work" / build_id,
        "output_dir": tmp_path / "builds" / build_id,
        "hooks": BOTH_HOOKS,
        "memory_mib": 512,
        "cache_dir": cache,
        # As a server configured to read zips from the directory the test wrote this one to.
        "artifact_file_roots": (Path(uri.removeprefix("file://")).parent,)
        if uri.startswith("file://")
        else (),
    }
    options.update(overrides)
    return BuildRequest(**options)


def build(driver: SandboxDriver, request: BuildRequest) -> Outcome:
    outcome = Outcome(request)
    try:
        outcome.result = asyncio.run(run_build(request, driver, outcome.log.append, outcome.stages.append))
    except BuildFailed as failure:
        outcome.failure = failure
    assert not request.work_dir.exists(), "the work dir is removed after every build"
    if outcome.failure is not None:
        leftovers = (
            sorted(p.name for p in request.output_dir.iterdir()) if request.output_dir.exists() else []
        )
        assert leftovers == [], f"a failed build leaves no outputs: {leftovers}"
    return outcome


def test_sample_app_ready_polling_snapshot_and_validate(
    driver: SandboxDriver, builder_cache: Path, sample_zip: Path, tmp_path: Path
) -> None:
    request = make_request(
        tmp_path, builder_cache, sample_zip.as_uri(), environment={"READY_DELAY": "1.5", "GREETING": "hi"}
    )
    outcome = build(driver, request)
    assert outcome.failure is None, outcome.failure
    result = outcome.result
    assert result is not None
    assert outcome.stages == list(STAGES)
    # 503 first ("not yet"), then 200; validate answered 200 in the restored throw-away sandbox.
    assert outcome.logged("ready hook: HTTP 503 (not ready yet); polling again"), outcome.log
    assert outcome.logged("ready hook: HTTP 200")
    assert outcome.logged("validate hook: HTTP 200")
    assert outcome.logged("app: sample app "), "the app's startup output is part of the build log"
    assert result.image_config.argv == ["python3", "app.py"]
    assert (
        result.rootfs_path == request.output_dir / "rootfs" and (result.rootfs_path / "app/app.py").exists()
    )
    assert result.snapshot_path.is_dir() and any(result.snapshot_path.iterdir())
    assert result.code_install_bytes > 100 * 1024 * 1024
    if driver.capabilities.memory_snapshot:
        assert result.memory_snapshot_bytes > 0
    assert json.loads((request.output_dir / "image-config.json").read_text())["argv"] == ["python3", "app.py"]
    assert BuildResult.from_record(json.loads(json.dumps(result.to_record()))) == result
    print({"stage_seconds": result.stage_seconds, "memory_snapshot_bytes": result.memory_snapshot_bytes})
    shutil.rmtree(request.output_dir)


ENV_CHECK_APP = """\
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        expected = json.loads(os.environ["EXPECTED"])
        wrong = {k: os.environ.get(k) for k, v in expected.items() if os.environ.get(k) != v}
        self.send_response(200 if not wrong and os.getcwd() == "/srv" else 500)
        self.send_header("Content-Length", "0")
        self.end_headers()
        print("wrong:", wrong, os.getcwd(), flush=True)

ThreadingHTTPServer(("0.0.0.0", 8081), Handler).serve_forever()
"""


def test_the_app_sees_image_env_user_env_and_injected_env(
    driver: SandboxDriver, builder_cache: Path, tmp_path: Path
) -> None:
    dockerfile = (
        "FROM public.ecr.aws/lambda/microvms:al2023-minimal\nENV FROM_IMAGE=yes OVERRIDDEN=image\n"
        'WORKDIR /srv\nCOPY check.py .\nCMD ["python3", "check.py"]\n'
    )
    expected = {
        "FROM_IMAGE": "yes",
        "OVERRIDDEN": "user",
        "AWS_LAMBDA_MICROVM_IMAGE_ARN": IMAGE_ARN,
        "AWS_LAMBDA_MICROVM_IMAGE_NAME": "sample-app",
        "AWS_LAMBDA_MICROVM_IMAGE_VERSION": "3.0",
        "AWS_REGION": "us-east-1",
    }
    archive = write_zip(
        tmp_path / "env.zip", [file("Dockerfile", dockerfile), file("check.py", ENV_CHECK_APP)]
    )
    hooks_8081 = {"port": 8081, "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 20}}
    request = make_request(
        tmp_path,
        builder_cache,
        archive.as_uri(),
        image_version="3.0",
        hooks=hooks_8081,
        environment={"OVERRIDDEN": "user", "EXPECTED": json.dumps(expected)},
    )
    outcome = build(driver, request)
    assert outcome.failure is None, outcome.failure
    assert outcome.stages == ["fetch", "unpack", "build", "start", "ready", "snapshot"]


@pytest.mark.parametrize(
    ("status", "kind"), [("500", "a server error (HTTP 5xx)"), ("404", "a client error (HTTP 4xx)")]
)
def test_ready_hook_error_status_fails_with_the_service_wording(
    driver: SandboxDriver, builder_cache: Path, sample_zip: Path, tmp_path: Path, status: str, kind: str
) -> None:
    request = make_request(
        tmp_path, builder_cache, sample_zip.as_uri(), hooks=hooks(), environment={"READY_STATUS": status}
    )
    outcome = build(driver, request)
    assert outcome.failure is not None and outcome.failure.code == READY_HOOK_FAILED
    assert (
        outcome.failure.state_reason == f"Ready hook check failed: the application returned {kind} response"
    )
    assert "snapshot" not in outcome.stages


def test_a_ready_hook_that_never_answers_times_out(
    driver: SandboxDriver, builder_cache: Path, sample_zip: Path, tmp_path: Path
) -> None:
    request = make_request(
        tmp_path,
        builder_cache,
        sample_zip.as_uri(),
        hooks=hooks(ready_timeout=2),
        environment={"READY_SLEEP": "3600"},
    )
    outcome = build(driver, request)
    assert outcome.failure is not None and outcome.failure.code == READY_HOOK_TIMEOUT
    reason = outcome.failure.state_reason
    assert reason.startswith("Ready hook timed out: the application did not answer")
    assert "within 2 seconds (readyTimeoutInSeconds)" in reason


def test_a_failing_validate_hook_runs_in_the_restored_sandbox_and_fails_the_build(
    driver: SandboxDriver, builder_cache: Path, sample_zip: Path, tmp_path: Path
) -> None:
    request = make_request(
        tmp_path, builder_cache, sample_zip.as_uri(), environment={"VALIDATE_STATUS": "500"}
    )
    outcome = build(driver, request)
    assert outcome.failure is not None and outcome.failure.code == VALIDATE_HOOK_FAILED
    assert outcome.failure.state_reason == (
        "Validate hook check failed: the application returned a server error (HTTP 5xx) response"
    )
    assert outcome.stages == list(STAGES)  # the snapshot was taken; validate ran after it


def test_without_hooks_the_snapshot_follows_the_port_opening(
    driver: SandboxDriver, builder_cache: Path, sample_zip: Path, tmp_path: Path
) -> None:
    outcome = build(driver, make_request(tmp_path, builder_cache, sample_zip.as_uri(), hooks=None))
    assert outcome.failure is None, outcome.failure
    assert outcome.logged("application accepts connections on port 8080")
    assert "validate" not in outcome.stages


def test_a_foreign_architecture_fails_at_once(
    driver: SandboxDriver, builder_cache: Path, sample_zip: Path, tmp_path: Path
) -> None:
    outcome = build(driver, make_request(tmp_path, builder_cache, sample_zip.as_uri(), architecture="ARM_64"))
    assert outcome.failure is not None and outcome.failure.code == ARCHITECTURE_NOT_SUPPORTED
    assert "ARM_64" in outcome.failure.state_reason and "aarch64" in outcome.failure.state_reason
    assert outcome.stages == []


def test_an_artifact_failure_ends_the_build_cleanly(
    driver: SandboxDriver, builder_cache: Path, tmp_path: Path
) -> None:
    outcome = build(driver, make_request(tmp_path, builder_cache, f"file://{tmp_path}/absent.zip"))
    assert outcome.failure is not None and outcome.failure.code == S3_NO_SUCH_KEY
    assert outcome.stages == ["fetch"]


def test_cancelling_a_build_destroys_its_sandbox(
    driver: SandboxDriver, builder_cache: Path, sample_zip: Path, tmp_path: Path
) -> None:
    request = make_request(
        tmp_path,
        builder_cache,
        sample_zip.as_uri(),
        hooks=hooks(ready_timeout=120),
        environment={"READY_SLEEP": "3600"},
    )
    stages: list[str] = []

    async def start_then_cancel() -> None:
        task = asyncio.ensure_future(run_build(request, driver, lambda _line: None, stages.append))
        while "ready" not in stages:
            await asyncio.sleep(0.05)
            assert not task.done(), task
        await asyncio.sleep(0.5)  # the ready request is now held open by the app
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(start_then_cancel())
    assert not request.work_dir.exists()
    assert not request.output_dir.exists() or list(request.output_dir.iterdir()) == []


@pytest.mark.parametrize("delay", [0.0, 1.5], ids=["at-once", "after-start"])
def test_an_app_that_exits_fails_the_build_without_waiting_for_the_timeout(
    driver: SandboxDriver, builder_cache: Path, tmp_path: Path, delay: float
) -> None:
    program = (
        f"import sys, time; print('cannot start: no config', flush=True); time.sleep({delay}); sys.exit(3)"
    )
    dockerfile = (
        f"FROM public.ecr.aws/lambda/microvms:al2023-minimal\nCMD {json.dumps(['python3', '-c', program])}\n"
    )
    archive = write_zip(tmp_path / "crash.zip", [file("Dockerfile", dockerfile)])
    request = make_request(tmp_path, builder_cache, archive.as_uri(), hooks=hooks(ready_timeout=300))
    outcome = build(driver, request)
    assert outcome.failure is not None and outcome.failure.code == APPLICATION_START_FAILED
    reason = outcome.failure.state_reason
    print(reason)
    assert reason.startswith("APPLICATION_START_FAILED: The application")
    assert "status 3" in reason, reason
    # Whether the driver saw it die while starting or the ready wait did, its output is reported.
    assert "cannot start: no config" in reason or outcome.logged("app: cannot start: no config"), outcome.log


def test_two_builds_at_once_do_not_collide(
    driver: SandboxDriver, builder_cache: Path, sample_zip: Path, tmp_path: Path
) -> None:
    requests = [
        make_request(tmp_path, builder_cache, sample_zip.as_uri(), hooks=hooks(validate=True)),
        make_request(tmp_path, builder_cache, sample_zip.as_uri(), hooks=None),
    ]

    async def both() -> list[BuildResult]:
        return list(
            await asyncio.gather(
                *(run_build(r, driver, lambda _line: None, lambda _stage: None) for r in requests)
            )
        )

    results = asyncio.run(both())
    assert [result.rootfs_path for result in results] == [r.output_dir / "rootfs" for r in requests]
    assert all((result.rootfs_path / "app/app.py").exists() for result in results)


def test_run_steps_are_held_by_a_cgroup_of_the_build_and_its_memory_limit(
    driver: SandboxDriver, builder_cache: Path, tmp_path: Path
) -> None:
    """buildah and every RUN step run in the build's own cgroup, beside the sandboxes' (below the
    delegated scope on a systemd cgroup v2 host), under its memory limit; it is gone afterwards."""
    from openmicrovm.builder.pipeline import BUILD_MEMORY_FLOOR_MIB
    from openmicrovm.runtime import cgroups, names

    grab = BUILD_MEMORY_FLOOR_MIB + 1024  # MiB, written to, so that it is really used
    dockerfile = (
        "FROM public.ecr.aws/lambda/microvms:al2023-minimal\n"
        "RUN cat /proc/self/cgroup\n"
        f"RUN python3 -c \"block = b'x' * ({grab} * 1024 * 1024); print('allocated', len(block))\"\n"
    )
    archive = write_zip(tmp_path / "greedy.zip", [file("Dockerfile", dockerfile)])
    request = make_request(tmp_path, builder_cache, archive.as_uri())
    outcome = build(driver, request)
    parent = names.cgroup_parent(driver.scope)  # type: ignore[attr-defined]
    job = f"{parent}/build-{request.build_id}"
    assert outcome.logged(job), outcome.log
    assert outcome.failure is not None, "a RUN step beyond the build's memory limit must not succeed"
    assert not outcome.logged(f"allocated {grab * 1024 * 1024}"), outcome.log
    assert "status 137" in outcome.failure.state_reason, (
        outcome.failure.state_reason
    )  # SIGKILL: out of memory
    layout: cgroups.Layout = driver.layout  # type: ignore[attr-defined]
    assert not any(path.exists() for path in layout.everywhere(job)), "the build's cgroup is removed"
