"""Building real images through the API: zipping apps, putting them in S3, waiting for states."""

from __future__ import annotations

import io
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

from tests.support.moto import MotoServer
from tests.support.server import REPO

SAMPLE_APP = REPO / "examples" / "sample-app"
MANAGED_BASE = "arn:aws:lambda:us-east-1:aws:microvm-image:al2023-1"
BUILD_ROLE = "arn:aws:iam::123456789012:role/microvm-build"
ALL_HOOKS = {
    "port": 8080,
    "microvmImageHooks": {
        "ready": "ENABLED",
        "readyTimeoutInSeconds": 60,
        "validate": "ENABLED",
        "validateTimeoutInSeconds": 60,
    },
    "microvmHooks": {
        "run": "ENABLED",
        "runTimeoutInSeconds": 30,
        "suspend": "ENABLED",
        "suspendTimeoutInSeconds": 30,
        "resume": "ENABLED",
        "resumeTimeoutInSeconds": 30,
        "terminate": "ENABLED",
        "terminateTimeoutInSeconds": 5,
    },
}
SETTLED_IMAGE_STATES = {"CREATED", "CREATE_FAILED", "UPDATED", "UPDATE_FAILED"}


def zip_files(files: dict[str, bytes | str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def zip_dir(path: Path) -> bytes:
    return zip_files(
        {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    )


def upload(moto: MotoServer, data: bytes, bucket: str = "artifacts") -> str:
    s3 = moto.client("s3")
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)
    key = f"{uuid.uuid4().hex}/app.zip"
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def sample_app_uri(moto: MotoServer) -> str:
    return upload(moto, zip_dir(SAMPLE_APP))


def image_request(name: str, uri: str, **overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "name": name,
        "baseImageArn": MANAGED_BASE,
        "buildRoleArn": BUILD_ROLE,
        "codeArtifact": {"uri": uri},
    }
    request.update(overrides)
    return request


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}")


def wait_image_settled(client: Any, arn: str, timeout: float = 600) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        image = client.get_microvm_image(imageIdentifier=arn)
        return image if image["state"] in SETTLED_IMAGE_STATES else None

    return wait_for(settled, timeout, f"image {arn} to settle", interval=0.5)


def wait_microvm(client: Any, microvm_id: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        vm = client.get_microvm(microvmIdentifier=microvm_id)
        return vm if vm["state"] in states else None

    return wait_for(reached, timeout, f"{microvm_id} to reach {sorted(states)}", interval=0.1)


def build_failure(client: Any, arn: str, version: str = "1.0") -> str:
    """The stateReason of the first failed build of a version."""
    builds = client.list_microvm_image_builds(imageIdentifier=arn, imageVersion=version)["items"]
    failed = [b for b in builds if b["buildState"] == "FAILED"]
    assert failed, f"no failed build in {builds}"
    return failed[0]["stateReason"]
