"""Fetching code artifacts from a real S3-compatible server (moto, as a subprocess) and file:// URIs."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from openmicrovm.builder.artifact import fetch_artifact, parse_artifact_uri
from openmicrovm.builder.errors import (
    ARCHIVE_INVALID,
    INTERNAL_PLATFORM_ERROR,
    S3_ACCESS_DENIED,
    S3_CROSS_REGION_ACCESS_DENIED,
    S3_INVALID_OBJECT,
    S3_NO_SUCH_BUCKET,
    S3_NO_SUCH_KEY,
    BuildFailed,
)
from tests.support.moto import MotoServer

ZIP_BYTES = b"PK\x05\x06" + bytes(18)  # an empty zip: fetching does not look inside


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Credentials for moto, and none of the machine's own AWS configuration."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return monkeypatch


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    name = f"artifacts-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=name)
    return name


def fetch(uri: str, tmp_path: Path, **options: object) -> tuple[int, Path]:
    destination = tmp_path / "build" / "artifact.zip"
    options.setdefault("region", "us-east-1")
    options.setdefault("max_bytes", 1024 * 1024)
    size = asyncio.run(fetch_artifact(uri, destination, **options))  # type: ignore[arg-type]
    return size, destination


def failure(uri: str, tmp_path: Path, **options: object) -> BuildFailed:
    with pytest.raises(BuildFailed) as caught:
        fetch(uri, tmp_path, **options)
    assert not (tmp_path / "build" / "artifact.zip").exists(), "a failed fetch leaves no partial file"
    return caught.value


def test_s3_object_is_fetched_from_an_explicit_endpoint(
    aws_env: pytest.MonkeyPatch, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    moto.client("s3").put_object(Bucket=bucket, Key="apps/app.zip", Body=ZIP_BYTES)
    size, path = fetch(f"s3://{bucket}/apps/app.zip", tmp_path, endpoint_url=moto.url)
    assert size == len(ZIP_BYTES) and path.read_bytes() == ZIP_BYTES


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_the_standard_endpoint_variables_are_honoured(
    aws_env: pytest.MonkeyPatch, moto: MotoServer, bucket: str, tmp_path: Path, variable: str
) -> None:
    moto.client("s3").put_object(Bucket=bucket, Key="app.zip", Body=ZIP_BYTES)
    aws_env.setenv(variable, moto.url)
    logged: list[str] = []
    size, _ = fetch(f"s3://{bucket}/app.zip", tmp_path, log=logged.append)
    assert size == len(ZIP_BYTES)
    assert any(moto.url in line for line in logged), logged


def test_an_explicit_endpoint_wins_over_the_environment(
    aws_env: pytest.MonkeyPatch, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    moto.client("s3").put_object(Bucket=bucket, Key="app.zip", Body=ZIP_BYTES)
    aws_env.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    size, _ = fetch(f"s3://{bucket}/app.zip", tmp_path, endpoint_url=moto.url)
    assert size == len(ZIP_BYTES)


def test_missing_bucket(aws_env: pytest.MonkeyPatch, moto: MotoServer, tmp_path: Path) -> None:
    error = failure(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/app.zip", tmp_path, endpoint_url=moto.url)
    assert error.code == S3_NO_SUCH_BUCKET
    assert error.state_reason.startswith("S3_NO_SUCH_BUCKET: The bucket 'no-such-bucket-")


def test_missing_key(aws_env: pytest.MonkeyPatch, moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    error = failure(f"s3://{bucket}/missing.zip", tmp_path, endpoint_url=moto.url)
    assert error.code == S3_NO_SUCH_KEY
    assert "missing.zip" in error.state_reason


def test_glacier_object_is_an_invalid_object(
    aws_env: pytest.MonkeyPatch, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    moto.client("s3").put_object(Bucket=bucket, Key="cold.zip", Body=ZIP_BYTES, StorageClass="GLACIER")
    error = failure(f"s3://{bucket}/cold.zip", tmp_path, endpoint_url=moto.url)
    assert error.code == S3_INVALID_OBJECT
    assert error.state_reason.startswith("S3_INVALID_OBJECT: ")


def test_bucket_in_another_region(aws_env: pytest.MonkeyPatch, moto: MotoServer, tmp_path: Path) -> None:
    name = f"eu-artifacts-{uuid.uuid4().hex[:8]}"
    moto.client("s3").create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    moto.client("s3").put_object(Bucket=name, Key="app.zip", Body=ZIP_BYTES)
    error = failure(f"s3://{name}/app.zip", tmp_path, endpoint_url=moto.url)
    assert error.code == S3_CROSS_REGION_ACCESS_DENIED
    assert "eu-west-1" in error.state_reason and "us-east-1" in error.state_reason


def test_no_credentials_is_access_denied(
    aws_env: pytest.MonkeyPatch, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    error = failure(f"s3://{bucket}/app.zip", tmp_path, endpoint_url=moto.url)
    assert error.code == S3_ACCESS_DENIED
    assert "credentials" in error.state_reason


def test_an_artifact_over_the_size_limit_is_refused(
    aws_env: pytest.MonkeyPatch, moto: MotoServer, bucket: str, tmp_path: Path
) -> None:
    moto.client("s3").put_object(Bucket=bucket, Key="big.zip", Body=bytes(4096))
    error = failure(f"s3://{bucket}/big.zip", tmp_path, endpoint_url=moto.url, max_bytes=1000)
    assert error.code == ARCHIVE_INVALID


def test_unreachable_endpoint_is_a_platform_error(aws_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    error = failure("s3://bucket/app.zip", tmp_path, endpoint_url="http://127.0.0.1:9")
    assert error.code == INTERNAL_PLATFORM_ERROR
    assert "127.0.0.1:9" in error.state_reason


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    """The directory the server reads file:// artifacts from (artifact_file_roots)."""
    root = tmp_path / "allowed"
    root.mkdir()
    return root


def test_file_uri(tmp_path: Path, allowed: Path) -> None:
    source = allowed / "my app.zip"
    source.write_bytes(ZIP_BYTES)
    size, path = fetch(source.as_uri(), tmp_path, file_roots=[allowed])
    assert size == len(ZIP_BYTES) and path.read_bytes() == ZIP_BYTES


def test_missing_file_uri(tmp_path: Path, allowed: Path) -> None:
    assert failure(f"file://{allowed}/absent.zip", tmp_path, file_roots=[allowed]).code == S3_NO_SUCH_KEY


def _refused(uri: str, tmp_path: Path, roots: list[Path]) -> str:
    error = failure(uri, tmp_path, file_roots=roots)
    assert error.code == S3_ACCESS_DENIED, error.state_reason
    assert (
        "artifact_file_roots" in error.state_reason
        and "OPENMICROVM_ARTIFACT_FILE_ROOTS" in error.state_reason
    )
    return error.state_reason


def test_a_file_outside_the_allowed_directories_is_refused(tmp_path: Path, allowed: Path) -> None:
    outside = tmp_path / "outside.zip"
    outside.write_bytes(ZIP_BYTES)
    reason = _refused(outside.as_uri(), tmp_path, [allowed])
    assert str(allowed) not in reason  # the server's own directories stay private
    # Any host file, and whether it exists or not: the answer is the same.
    assert "not below a directory" in _refused("file:///etc/shadow", tmp_path, [allowed])
    assert "not below a directory" in _refused("file:///no/such/file.zip", tmp_path, [allowed])
    # `..` is resolved before the check.
    _refused(f"file://{allowed}/../outside.zip", tmp_path, [allowed])
    # No roots at all (a BuildRequest that names none): no file:// artifact.
    _refused(outside.as_uri(), tmp_path, [])


def test_a_symlink_inside_an_allowed_directory_cannot_lead_out(tmp_path: Path, allowed: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.zip").write_bytes(ZIP_BYTES)
    (allowed / "link.zip").symlink_to(secret / "key.zip")
    assert "symlink" in _refused((allowed / "link.zip").as_uri(), tmp_path, [allowed])
    # A directory symlink passes a check of the path as written: only the opened file tells.
    (allowed / "dir").symlink_to(secret, target_is_directory=True)
    reason = _refused((allowed / "dir" / "key.zip").as_uri(), tmp_path, [allowed])
    assert "leads outside" in reason


def test_an_allowed_directory_reached_through_a_symlink_works(tmp_path: Path, allowed: Path) -> None:
    # A root given through a symlink (as /tmp or /home often are) is resolved like the file.
    alias = tmp_path / "alias"
    alias.symlink_to(allowed, target_is_directory=True)
    (allowed / "app.zip").write_bytes(ZIP_BYTES)
    assert fetch((alias / "app.zip").as_uri(), tmp_path, file_roots=[alias])[0] == len(ZIP_BYTES)
    assert fetch((allowed / "app.zip").as_uri(), tmp_path, file_roots=[alias])[0] == len(ZIP_BYTES)


def test_a_fifo_in_an_allowed_directory_is_not_read(tmp_path: Path, allowed: Path) -> None:
    # Opening a FIFO for reading would hang the build until a writer came: it is never opened.
    os.mkfifo(allowed / "pipe.zip")
    error = failure((allowed / "pipe.zip").as_uri(), tmp_path, file_roots=[allowed])
    assert error.code == S3_NO_SUCH_KEY


@pytest.mark.parametrize(
    "uri", ["s3://bucket-only", "s3:///key", "https://example.com/app.zip", "file://host/a.zip"]
)
def test_malformed_uris(uri: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        parse_artifact_uri(uri)
    assert failure(uri, tmp_path).code == ARCHIVE_INVALID
