"""A thin, thread-safe client of one S3-compatible store: put-if-absent, streaming get, list, delete.

boto3 blocks, so this class is synchronous on purpose: publish() and fetch() run their whole body
in a worker thread and fan transfers out over a small pool of their own (transfer.py), and one
boto3 client (thread-safe once made) serves every thread. Every boto3 or connection failure comes
out as an ObjectStoreError naming the store, the key and what an operator can do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from .errors import ObjectMissing, ObjectStoreError
from .location import StoreLocation, parse_store_url

if TYPE_CHECKING:
    from openmicrovm.config import Settings

DEFAULT_REGION = "us-east-1"
# Transfers wait on the network, not the CPU: 8 in flight keeps a link busy with small files while
# compression (zlib releases the GIL) still fits the 2 cores of our hosts.
DEFAULT_WORKERS = 8
# Below this a blob goes up in one PutObject from memory; above it boto3's managed upload splits it
# into parts (a memory snapshot can be gigabytes).
SINGLE_PUT_LIMIT = 8 * 1024 * 1024
READ_CHUNK = 1024 * 1024
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


@dataclass(frozen=True)
class StoredObject:
    key: str
    metadata: Mapping[str, str]
    size: int  # bytes as stored (after compression)
    chunks: Iterator[bytes]


class ObjectStore:
    """One `s3://bucket/prefix` store. `endpoint_url` names a non-AWS server (MinIO, moto, Ceph);
    credentials and region come from boto3's usual chain (environment, ~/.aws, instance role)."""

    def __init__(self, url: str, endpoint_url: str = "", *, workers: int = DEFAULT_WORKERS) -> None:
        self.location: StoreLocation = parse_store_url(url)
        self.endpoint_url = endpoint_url
        self.workers = max(1, workers)
        session = boto3.session.Session()
        config = Config(
            max_pool_connections=self.workers * 2,
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            # Virtual-host addressing needs DNS for <bucket>.<host>, which self-hosted servers
            # rarely have; AWS itself accepts either.
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        self.client: Any = session.client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=session.region_name or DEFAULT_REGION,
            config=config,
        )
        self._transfer = TransferConfig(multipart_threshold=64 * 1024 * 1024, max_concurrency=4)

    @classmethod
    def from_settings(cls, settings: Settings) -> ObjectStore | None:
        """The store the settings name, or None when snapshot_store_url is empty (one host)."""
        if not settings.snapshot_store_url:
            return None
        return cls(settings.snapshot_store_url, settings.snapshot_store_endpoint_url)

    @property
    def url(self) -> str:
        return self.location.url

    # ------------------------------------------------------------------ errors

    def _error(self, action: str, key: str, error: Exception) -> ObjectStoreError:
        where = f"object store {self.url}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_CODES:
                return ObjectMissing(f"{where}: {key} does not exist")
            if code == "NoSuchBucket":
                return ObjectStoreError(
                    f"{where}: the bucket {self.location.bucket} does not exist; create it or fix snapshot_store_url"
                )
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                return ObjectStoreError(
                    f"{where}: access denied to {action} {key} ({code}); check the AWS credentials "
                    "this host uses (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws) and their permissions"
                )
        if isinstance(error, NoCredentialsError):
            return ObjectStoreError(
                f"{where}: no AWS credentials to {action} {key}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or a profile in ~/.aws) for the object store"
            )
        return ObjectStoreError(f"{where}: cannot {action} {key}: {error}")

    @contextlib.contextmanager
    def _calling(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError, OSError) as error:
            raise self._error(action, key, error) from error

    # ------------------------------------------------------------------ operations

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.location.bucket, Key=key)
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code", "")) in _MISSING_CODES:
                return False
            raise self._error("look up", key, error) from error
        except (BotoCoreError, OSError) as error:
            raise self._error("look up", key, error) from error
        return True

    def put(self, key: str, body: bytes | IO[bytes], metadata: Mapping[str, str]) -> None:
        """Store `body` under `key` (bytes in one request, a file object in parts if large)."""
        with self._calling("upload", key):
            if isinstance(body, bytes):
                self.client.put_object(
                    Bucket=self.location.bucket, Key=key, Body=body, Metadata=dict(metadata)
                )
            else:
                self.client.upload_fileobj(
                    body,
                    self.location.bucket,
                    key,
                    ExtraArgs={"Metadata": dict(metadata)},
                    Config=self._transfer,
                )

    def put_if_absent(self, key: str, body: bytes | IO[bytes], metadata: Mapping[str, str]) -> bool:
        """Keys are content hashes, so an existing key already holds these bytes: skip it. Two hosts
        racing on one key both write the same content, which is harmless. True when uploaded."""
        if self.exists(key):
            return False
        self.put(key, body, metadata)
        return True

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[StoredObject]:
        """Stream one object; a missing key raises ObjectMissing."""
        with self._calling("download", key):
            response = self.client.get_object(Bucket=self.location.bucket, Key=key)
        body = response["Body"]
        try:
            yield StoredObject(
                key=key,
                metadata=response.get("Metadata") or {},
                size=int(response.get("ContentLength") or 0),
                chunks=self._chunks(key, body),
            )
        finally:
            body.close()

    def _chunks(self, key: str, body: Any) -> Iterator[bytes]:
        with self._calling("download", key):
            yield from body.iter_chunks(READ_CHUNK)

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key under `prefix` (a full key prefix, e.g. location.blobs_prefix())."""
        paginator = self.client.get_paginator("list_objects_v2")
        with self._calling("list", prefix):
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    yield item["Key"]

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key under `prefix`; returns how many. For tests and for an operator
        retiring a whole store: blobs are shared by versions, so never delete single blobs."""
        keys = list(self.list_keys(prefix))
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            with self._calling("delete", prefix):
                self.client.delete_objects(
                    Bucket=self.location.bucket, Delete={"Objects": batch, "Quiet": True}
                )
        return len(keys)
