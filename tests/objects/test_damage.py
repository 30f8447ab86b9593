"""A store that lost or damaged a manifest or a blob: fetch says which and what to do, and leaves
no tree behind (a later fetch, after the version is published again, succeeds)."""

from __future__ import annotations

import asyncio
import hashlib
import zlib
from pathlib import Path

import pytest

from openmicrovm.objects import ObjectStore, ObjectStoreError, fetch, publish
from tests.objects.trees import make_outputs


def _only_leftovers(cache_root: Path) -> list[str]:
    """What is in the cache root besides its bookkeeping dirs: must be nothing."""
    if not cache_root.exists():
        return []
    return sorted(path.name for path in cache_root.iterdir() if path.name not in (".locks", "manifests"))


def _app_blob(outputs: Path) -> str:
    return hashlib.sha256((outputs / "rootfs/app/app.py").read_bytes()).hexdigest()


def test_a_corrupt_blob_is_detected(store: ObjectStore, tmp_path: Path) -> None:
    outputs = make_outputs(tmp_path / "outputs")
    published = asyncio.run(publish(store, outputs))
    sha = _app_blob(outputs)
    key = store.location.blob_key(sha)
    head = store.client.head_object(Bucket=store.location.bucket, Key=key)
    good = store.client.get_object(Bucket=store.location.bucket, Key=key)["Body"].read()
    # Same length, same encoding, one byte changed: only the hash can tell.
    original = zlib.decompress(good) if head["Metadata"]["encoding"] == "zlib" else good
    tampered = original.replace(b"version 1", b"version X")
    body = zlib.compress(tampered) if head["Metadata"]["encoding"] == "zlib" else tampered
    store.client.put_object(Bucket=store.location.bucket, Key=key, Body=body, Metadata=head["Metadata"])
    cache_root = tmp_path / "cache"
    with pytest.raises(
        ObjectStoreError, match=r"rootfs/app/app\.py .* is corrupt .* does not hash to"
    ) as caught:
        asyncio.run(fetch(store, published.manifest_uri, cache_root))
    assert "publish the version again" in str(caught.value)
    assert _only_leftovers(cache_root) == []

    # The operator's remedy, as the message says: delete the blob, publish again, fetch.
    store.client.delete_object(Bucket=store.location.bucket, Key=key)
    assert asyncio.run(publish(store, outputs)).new_blobs == 1
    fetched = asyncio.run(fetch(store, published.manifest_uri, cache_root))
    assert (fetched / "rootfs/app/app.py").read_bytes() == (outputs / "rootfs/app/app.py").read_bytes()


def test_a_garbage_blob_is_detected(store: ObjectStore, tmp_path: Path) -> None:
    outputs = make_outputs(tmp_path / "outputs")
    published = asyncio.run(publish(store, outputs))
    key = store.location.blob_key(_app_blob(outputs))
    store.client.put_object(
        Bucket=store.location.bucket, Key=key, Body=b"\x78\x9cnot zlib", Metadata={"encoding": "zlib"}
    )
    with pytest.raises(ObjectStoreError, match="not a valid zlib stream"):
        asyncio.run(fetch(store, published.manifest_uri, tmp_path / "cache"))
    assert _only_leftovers(tmp_path / "cache") == []


def test_a_missing_blob_is_reported(store: ObjectStore, tmp_path: Path) -> None:
    outputs = make_outputs(tmp_path / "outputs")
    published = asyncio.run(publish(store, outputs))
    store.client.delete_object(Bucket=store.location.bucket, Key=store.location.blob_key(_app_blob(outputs)))
    with pytest.raises(ObjectStoreError, match=r"rootfs/app/app\.py .* is missing from the object store"):
        asyncio.run(fetch(store, published.manifest_uri, tmp_path / "cache"))
    assert _only_leftovers(tmp_path / "cache") == []


def test_a_missing_or_corrupt_manifest_is_reported(store: ObjectStore, tmp_path: Path) -> None:
    never = store.location.manifest_uri("0" * 64)
    with pytest.raises(ObjectStoreError, match="is not in the object store: the version was never published"):
        asyncio.run(fetch(store, never, tmp_path / "cache"))
    published = asyncio.run(publish(store, make_outputs(tmp_path / "outputs")))
    key = store.location.manifest_key(published.manifest_sha256)
    store.client.put_object(Bucket=store.location.bucket, Key=key, Body=b'{"format": 1, "entries": []}')
    with pytest.raises(ObjectStoreError, match=r"is corrupt .* does not hash to"):
        asyncio.run(fetch(store, published.manifest_uri, tmp_path / "cache"))
    assert _only_leftovers(tmp_path / "cache") == []


def test_an_unreachable_store_is_reported(tmp_path: Path, aws_environment: dict[str, str]) -> None:
    from tests.support.server import free_port

    store = ObjectStore("s3://nobody-home/x", f"http://127.0.0.1:{free_port()}", workers=1)
    with pytest.raises(
        ObjectStoreError, match=r"object store s3://nobody-home/x at http://127\.0\.0\.1:\d+: cannot"
    ):
        asyncio.run(fetch(store, store.location.manifest_uri("1" * 64), tmp_path / "cache"))


def test_a_missing_bucket_is_reported(store: ObjectStore, tmp_path: Path) -> None:
    other = ObjectStore("s3://no-such-bucket-here/x", store.endpoint_url, workers=1)
    with pytest.raises(ObjectStoreError, match="the bucket no-such-bucket-here does not exist"):
        asyncio.run(publish(other, make_outputs(tmp_path / "outputs")))
