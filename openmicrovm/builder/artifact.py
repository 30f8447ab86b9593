"""Fetching a code artifact (`codeArtifact.uri`) into the build's own directory.

`s3://bucket/key` is read with boto3. The endpoint and credentials come from the standard AWS
configuration (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, the credential chain), so the same server
works against real S3, MinIO or moto; an explicit endpoint passed in wins. `file:///path.zip`
is accepted for offline use, from the directories of the setting artifact_file_roots only (else
any API caller could make the server read any file of the host). Every failure becomes a
BuildFailed with the spec's reason code; a file the server may not read is S3_ACCESS_DENIED, as
an object the build role may not read is on AWS.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from openmicrovm.builder.cleanup import Aborted, in_thread
from openmicrovm.builder.errors import (
    ARCHIVE_INVALID,
    INTERNAL_PLATFORM_ERROR,
    S3_ACCESS_DENIED,
    S3_CROSS_REGION_ACCESS_DENIED,
    S3_INVALID_OBJECT,
    S3_NO_SUCH_BUCKET,
    S3_NO_SUCH_KEY,
    BuildFailed,
    disk_full,
    is_disk_full,
)

_CHUNK = 1024 * 1024
# Storage classes whose objects cannot be read without a restore first (S3 answers
# InvalidObjectState for them; the class check covers S3-compatible stores that do not).
_ARCHIVED_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})

# S3 error codes, grouped by the build reason they map to.
_NO_SUCH_BUCKET_CODES = frozenset({"NoSuchBucket"})
_NO_SUCH_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_ACCESS_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
        "AccountProblem",
    }
)
_INVALID_OBJECT_CODES = frozenset({"InvalidObjectState"})
_CROSS_REGION_CODES = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed", "301"})


@dataclass(frozen=True)
class ArtifactLocation:
    scheme: str  # "s3" or "file"
    bucket: str  # empty for file://
    key: str  # the object key, or the absolute path for file://

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.scheme == "s3" else f"file://{self.key}"


def parse_artifact_uri(uri: str) -> ArtifactLocation:
    """Split an artifact URI; ValueError names what is wrong (the service can check this early)."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket or not key:
            raise ValueError(f"artifact URI {uri!r} must have the form s3://bucket/key")
        return ArtifactLocation("s3", bucket, key)
    if uri.startswith("file://"):
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(
                f"artifact URI {uri!r} names host {parsed.netloc!r}; use file:///absolute/path.zip"
            )
        path = urllib.parse.unquote(parsed.path)
        if not path.startswith("/"):
            raise ValueError(f"artifact URI {uri!r} must hold an absolute path: file:///absolute/path.zip")
        return ArtifactLocation("file", "", path)
    raise ValueError(f"artifact URI {uri!r} must start with s3:// (or file:// for a local zip)")


async def fetch_artifact(
    uri: str,
    destination: Path,
    *,
    region: str,
    max_bytes: int,
    endpoint_url: str | None = None,
    require_bucket_region: bool = True,
    file_roots: Sequence[Path] = (),
    log: Callable[[str], None] | None = None,
) -> int:
    """Download the artifact to `destination`; returns its size in bytes.

    `require_bucket_region`: fail with S3_CROSS_REGION_ACCESS_DENIED when S3 reports the bucket
    in another region than `region`, as AWS does. Where the store does not report a region the
    check is skipped. `file_roots`: the directories a file:// artifact may be read from (none:
    file:// artifacts are refused).
    """
    try:
        location = parse_artifact_uri(uri)
    except ValueError as error:
        raise BuildFailed.because(ARCHIVE_INVALID, f"{error}.") from None
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        thread_log = _from_thread(log) if log is not None else None
        if location.scheme == "file":
            return await in_thread(
                lambda abort: _copy_local(location, file_roots, destination, max_bytes, abort)
            )
        return await in_thread(
            lambda abort: _download_s3(
                location,
                destination,
                region,
                max_bytes,
                endpoint_url,
                require_bucket_region,
                thread_log,
                abort,
            )
        )
    except (BuildFailed, asyncio.CancelledError):
        destination.unlink(missing_ok=True)
        raise
    except OSError as error:
        destination.unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full(f"downloading the code artifact {location}") from None
        raise BuildFailed.because(
            INTERNAL_PLATFORM_ERROR, f"Could not store the code artifact {location}: {error}."
        ) from None


def _from_thread(log: Callable[[str], None]) -> Callable[[str], None]:
    """The download reports from a worker thread; hand its lines to the event loop's thread."""
    loop = asyncio.get_running_loop()
    return lambda line: loop.call_soon_threadsafe(log, line)


def _too_large(location: ArtifactLocation, max_bytes: int) -> BuildFailed:
    return BuildFailed.because(
        ARCHIVE_INVALID,
        f"The code artifact {location} is larger than the {max_bytes} bytes this server accepts.",
    )


def _check_size(total: int, location: ArtifactLocation, max_bytes: int) -> None:
    if total > max_bytes:
        raise _too_large(location, max_bytes)


def _copy_chunks(
    read: Callable[[int], bytes], out: BinaryIO, abort: threading.Event, limit: Callable[[int], None]
) -> int:
    """Copy until EOF; `limit(total)` may raise, the abort flag stops a cancelled build."""
    total = 0
    while chunk := read(_CHUNK):
        if abort.is_set():
            raise Aborted("fetch cancelled")
        total += len(chunk)
        limit(total)
        out.write(chunk)
    return total


def _not_allowed(location: ArtifactLocation, why: str) -> BuildFailed:
    # The server's own directories are not named: the message goes to API callers.
    return BuildFailed.because(
        S3_ACCESS_DENIED,
        f"The server may not read the code artifact {location}: {why}. file:// artifacts are read "
        "only from the directories of the setting artifact_file_roots (environment "
        "OPENMICROVM_ARTIFACT_FILE_ROOTS, colon-separated; default <data dir>/artifacts, where "
        "`openmicrovm deploy` puts its zips). Add the zip's directory there, or use an s3:// URI.",
    )


def _within(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _open_allowed(location: ArtifactLocation, roots: Sequence[Path]) -> int:
    """Open a file:// artifact for reading, but only a regular file that really lies below one of
    `roots` once every symlink and `..` is resolved, and that has no other name (hard link). The
    checks are made on what was opened (the O_PATH descriptor's /proc path and fstat), so swapping
    a path component for a symlink between a check and the open cannot redirect the read; O_PATH
    opens nothing (no device is touched) until the checks passed."""
    real_roots = [os.path.realpath(root) for root in roots]
    # Before touching the file system: a path outside every root is refused whether it exists or
    # not, so the refusal does not tell callers which host files exist.
    lexical = os.path.normpath(location.key)
    if not _within(lexical, [*real_roots, *(os.path.normpath(root) for root in roots)]):
        raise _not_allowed(location, "it is not below a directory this server reads artifacts from")
    try:
        # With O_NOFOLLOW, O_PATH opens a symlink itself rather than failing: fstat tells.
        handle = os.open(location.key, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise BuildFailed.because(
            S3_NO_SUCH_KEY, f"The code artifact {location} does not exist or is not a regular file."
        ) from None
    try:
        info = os.fstat(handle)
        mode = info.st_mode
        if stat.S_ISLNK(mode):
            raise _not_allowed(location, "it is a symlink")
        if not _within(os.readlink(f"/proc/self/fd/{handle}"), real_roots):
            raise _not_allowed(
                location, "a symlink or '..' in its path leads outside the allowed directories"
            )
        if not stat.S_ISREG(mode):
            raise BuildFailed.because(
                S3_NO_SUCH_KEY, f"The code artifact {location} does not exist or is not a regular file."
            )
        # A second name for a file elsewhere: in a directory other users may write to (a shared
        # upload directory), a hard link would let them have a file they may not read, the
        # server's or another user's, built into their image, where the kernel does not forbid
        # such links (fs.protected_hardlinks=0). `openmicrovm deploy` never makes one.
        if info.st_nlink > 1:
            raise _not_allowed(location, "it has more than one hard link")
        # Reopening the O_PATH descriptor through /proc opens the very file that was checked.
        return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(handle)


def _copy_local(
    location: ArtifactLocation,
    roots: Sequence[Path],
    destination: Path,
    max_bytes: int,
    abort: threading.Event,
) -> int:
    try:
        with open(_open_allowed(location, roots), "rb") as src:
            if os.fstat(src.fileno()).st_size > max_bytes:
                raise _too_large(location, max_bytes)
            with open(destination, "wb") as dst:
                _copy_chunks(src.read, dst, abort, lambda total: _check_size(total, location, max_bytes))
    except PermissionError:
        raise BuildFailed.because(
            S3_ACCESS_DENIED, f"The server may not read the code artifact {location}; check its permissions."
        ) from None
    return destination.stat().st_size


def _s3_client(region: str, endpoint_url: str | None) -> Any:
    import boto3
    from botocore.config import Config

    # endpoint_url=None lets botocore apply AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and the
    # profile's endpoint settings itself; timeouts keep a dead endpoint from hanging the build.
    config = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.session.Session().client("s3", region_name=region, endpoint_url=endpoint_url, config=config)


def _download_s3(
    location: ArtifactLocation,
    destination: Path,
    region: str,
    max_bytes: int,
    endpoint_url: str | None,
    require_bucket_region: bool,
    log: Callable[[str], None] | None,
    abort: threading.Event,
) -> int:
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    try:
        client = _s3_client(region, endpoint_url)
        if log is not None:
            log(f"fetching {location} from {client.meta.endpoint_url}")
        if require_bucket_region:
            _check_bucket_region(client, location, region)
        response = client.get_object(Bucket=location.bucket, Key=location.key)
        if response.get("StorageClass") in _ARCHIVED_CLASSES and not response.get("Restore"):
            response["Body"].close()
            raise _invalid_object(location, f"it is stored in the {response['StorageClass']} class")
        if int(response.get("ContentLength") or 0) > max_bytes:
            response["Body"].close()
            raise _too_large(location, max_bytes)
        with response["Body"] as body, open(destination, "wb") as out:
            # Count what actually arrives: Content-Length is the store's word, not a limit.
            return _copy_chunks(body.read, out, abort, lambda total: _check_size(total, location, max_bytes))
    except ClientError as error:
        raise _map_client_error(error, location, region) from None
    except NoCredentialsError:
        raise BuildFailed.because(
            S3_ACCESS_DENIED,
            f"No AWS credentials were found to read {location}. Configure credentials for the server "
            "(environment, shared credentials file or instance role).",
        ) from None
    except EndpointConnectionError as error:
        raise BuildFailed.because(
            INTERNAL_PLATFORM_ERROR,
            f"Could not reach the S3 endpoint to read {location}: {error}. Check AWS_ENDPOINT_URL_S3 "
            "or the server's network.",
        ) from None
    except BotoCoreError as error:
        raise BuildFailed.because(
            INTERNAL_PLATFORM_ERROR, f"Reading {location} from S3 failed: {error}."
        ) from None


def _check_bucket_region(client: Any, location: ArtifactLocation, region: str) -> None:
    from botocore.exceptions import ClientError

    try:
        response = client.head_bucket(Bucket=location.bucket)
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise _no_such_bucket(location) from None
        # HeadBucket needs s3:ListBucket, which a build role that only has s3:GetObject lacks;
        # GetObject decides then, and a redirect still reveals a foreign region.
        headers = error.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    bucket_region = headers.get("x-amz-bucket-region")
    if bucket_region and bucket_region != region:
        raise _cross_region(location, bucket_region, region)


def _no_such_bucket(location: ArtifactLocation) -> BuildFailed:
    return BuildFailed.because(
        S3_NO_SUCH_BUCKET,
        f"The bucket {location.bucket!r} of the code artifact {location} does not exist. Check the bucket "
        "name and the S3 endpoint the server uses.",
    )


def _cross_region(location: ArtifactLocation, bucket_region: str, region: str) -> BuildFailed:
    return BuildFailed.because(
        S3_CROSS_REGION_ACCESS_DENIED,
        f"The bucket {location.bucket!r} is in {bucket_region}, but the image is built in {region}. "
        "Put the artifact in a bucket in the image's Region.",
    )


def _invalid_object(location: ArtifactLocation, why: str) -> BuildFailed:
    return BuildFailed.because(
        S3_INVALID_OBJECT,
        f"The code artifact {location} cannot be read because {why}. Store it in a standard storage "
        "class (or restore it) and retry.",
    )


def _map_client_error(error: Any, location: ArtifactLocation, region: str) -> BuildFailed:
    details = error.response.get("Error", {})
    code = str(details.get("Code", ""))
    message = details.get("Message") or code
    if code in _NO_SUCH_BUCKET_CODES:
        return _no_such_bucket(location)
    if code in _NO_SUCH_KEY_CODES:
        return BuildFailed.because(
            S3_NO_SUCH_KEY, f"The object {location.key!r} does not exist in bucket {location.bucket!r}."
        )
    if code in _INVALID_OBJECT_CODES:
        return _invalid_object(location, f"S3 reports {code}: {message}")
    if code in _CROSS_REGION_CODES:
        headers = error.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        return _cross_region(location, headers.get("x-amz-bucket-region", "another Region"), region)
    if code in _ACCESS_DENIED_CODES:
        return BuildFailed.because(
            S3_ACCESS_DENIED,
            f"Access to the code artifact {location} was denied ({code}: {message}). Allow s3:GetObject "
            "on it for the credentials the server uses.",
        )
    return BuildFailed.because(
        INTERNAL_PLATFORM_ERROR, f"S3 refused to return the code artifact {location} ({code}: {message})."
    )
