"""Where things live in the store: `s3://bucket/prefix` parsed once, and the keys below it.

    <prefix>/blobs/<sha[:2]>/<sha256>    a regular file's bytes, stored once for the whole store
    <prefix>/manifests/<sha256>.json     one version's tree, named by the hash of its own JSON

Blobs are sharded by the first two hex digits because S3 scales request rates per key prefix;
names are content hashes, so a key says nothing about which version or account it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BLOBS = "blobs"
MANIFESTS = "manifests"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# S3's bucket naming rules (no uppercase, no underscores; dots allowed but not as '..').
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_sha256(text: str) -> bool:
    return bool(_SHA256.fullmatch(text))


@dataclass(frozen=True)
class StoreLocation:
    bucket: str
    prefix: str  # "" or "a/b" (no leading or trailing slash)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts)) if self.prefix else "/".join(parts)

    def blob_key(self, sha256: str) -> str:
        return self.key(BLOBS, sha256[:2], sha256)

    def blobs_prefix(self) -> str:
        return self.key(BLOBS) + "/"

    def manifest_key(self, sha256: str) -> str:
        return self.key(MANIFESTS, f"{sha256}.json")

    def manifest_uri(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.manifest_key(sha256)}"

    def manifest_sha(self, manifest_uri: str) -> str:
        """The hash a manifest URI of this store names; ValueError for any other URI, so that a
        version published to one store is never looked for (or trusted) in another."""
        expected = f"s3://{self.bucket}/{self.key(MANIFESTS, '')}"
        if not manifest_uri.startswith(expected) or not manifest_uri.endswith(".json"):
            raise ValueError(
                f"{manifest_uri!r} is not a manifest of the object store {self.url} ({expected}<sha256>.json)"
            )
        sha = manifest_uri[len(expected) : -len(".json")]
        if not is_sha256(sha):
            raise ValueError(
                f"{manifest_uri!r} does not name a manifest by its sha256 (64 lowercase hex digits)"
            )
        return sha


def parse_store_url(url: str) -> StoreLocation:
    """`s3://bucket` or `s3://bucket/some/prefix` (a trailing slash is allowed)."""
    if not url.startswith("s3://"):
        raise ValueError(f"snapshot_store_url {url!r} must look like s3://bucket/prefix")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"snapshot_store_url {url!r} names no bucket (expected s3://bucket/prefix)")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"snapshot_store_url {url!r}: {bucket!r} is not a valid S3 bucket name "
            "(3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit)"
        )
    prefix = prefix.rstrip("/")
    parts = prefix.split("/") if prefix else []
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(
                f"snapshot_store_url {url!r}: the prefix {prefix!r} has an empty, '.' or '..' segment"
            )
    if any(ord(character) < 0x20 or character == "\x7f" for character in prefix):
        raise ValueError(f"snapshot_store_url {url!r}: the prefix has a control character")
    return StoreLocation(bucket, prefix)
