"""A version's outputs published from one directory come back, from the store, exactly as they
were: owners, modes with setuid/setgid/sticky, xattrs (file capabilities, user.*), hard links,
symlinks (dangling too), empty dirs, a fifo, a device node, times, and the snapshot pointing at
the fetched root filesystem."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest

from openmicrovm.objects import ObjectStore, fetch, parse_store_url, publish
from openmicrovm.objects.codec import ENCODING, ZLIB
from openmicrovm.runtime.gvisor.records import GVisorSnapshotMeta
from openmicrovm.runtime.records import SNAPSHOT_FILE, read_snapshot_meta
from tests.objects.conftest import CallCounter, stored_objects
from tests.objects.trees import (
    CAP_NET_RAW,
    CAP_NET_RAW_IN_NAMESPACE,
    ID,
    describe,
    make_outputs,
    snapshot_meta,
)

META = f"snapshot/{SNAPSHOT_FILE}"


def test_every_entry_type_round_trips(store: ObjectStore, tmp_path: Path) -> None:
    outputs = make_outputs(tmp_path / "built-on-host-a" / "outputs")
    published = asyncio.run(publish(store, outputs))
    assert (
        published.manifest_uri
        == f"s3://{store.location.bucket}/fleet/a/manifests/{published.manifest_sha256}.json"
    )
    cache_root = tmp_path / "host-b-cache"
    fetched = asyncio.run(fetch(store, published.manifest_uri, cache_root))

    assert fetched == cache_root / published.manifest_sha256
    before, after = describe(outputs, skip=(META,)), describe(fetched, skip=(META,))
    assert after == before
    # Spot checks, so that describe() itself cannot hide a loss.
    tool = after["rootfs/bin/tool"]
    assert tool["mode"] == 0o4755 and tool["owner"] == (ID, ID)
    assert after["rootfs/bin/tool-again"]["link_of"] == "rootfs/bin/tool"
    assert after["rootfs/bin/ping"]["xattrs"] == {"security.capability": CAP_NET_RAW}
    assert after["rootfs/bin/ping6"]["xattrs"] == {"security.capability": CAP_NET_RAW_IN_NAMESPACE}
    assert after["rootfs/etc/app.conf"]["xattrs"] == {"user.note": b"\x00binary\xffvalue"}
    assert after["rootfs/etc/app.conf"]["owner"] == (ID + 1000, ID + 1000)
    assert after["rootfs/dangling"]["target"] == "/nowhere/at/all"
    assert after["rootfs/dangling"]["owner"] == (ID + 7, ID + 8)
    assert stat.S_ISFIFO(after["rootfs/run/fifo"]["format"]) and after["rootfs/run/fifo"]["mode"] == 0o620
    assert after["rootfs/dev/null"]["rdev"] == (1, 3)
    assert after["rootfs/tmp"]["mode"] == 0o1777 and after["rootfs/setgid-dir"]["mode"] == 0o2775
    assert after["rootfs/empty"]["mtime_ns"] == 1_650_000_000 * 10**9
    assert stat.S_IMODE(os.stat(cache_root).st_mode) == 0o700

    # The snapshot names the fetched rootfs; everything else in its meta is as published.
    meta = read_snapshot_meta(fetched / "snapshot", "gvisor")
    assert meta.spec.rootfs == fetched / "rootfs"
    original = json.loads((outputs / META).read_text())
    relocated = json.loads((fetched / META).read_text())
    original["spec"]["rootfs"] = str(fetched / "rootfs")
    assert relocated == original
    meta_stat, original_stat = os.lstat(fetched / META), os.lstat(outputs / META)
    assert (meta_stat.st_mode, meta_stat.st_mtime_ns) == (original_stat.st_mode, original_stat.st_mtime_ns)
    assert not list(cache_root.glob(".*.partial"))


def test_a_fetched_version_is_served_from_the_cache(store: ObjectStore, tmp_path: Path) -> None:
    published = asyncio.run(publish(store, make_outputs(tmp_path / "outputs")))
    first = asyncio.run(fetch(store, published.manifest_uri, tmp_path / "cache"))
    gets = CallCounter(store, "GetObject")
    again = asyncio.run(fetch(store, published.manifest_uri, tmp_path / "cache"))
    assert again == first
    assert gets.count == 0


def test_blobs_are_compressed_only_when_it_pays(store: ObjectStore, tmp_path: Path) -> None:
    outputs = make_outputs(tmp_path / "outputs")
    asyncio.run(publish(store, outputs))
    stored = stored_objects(store)
    encodings = {}
    for key in stored:
        if "/blobs/" in key:
            head = store.client.head_object(Bucket=store.location.bucket, Key=key)
            encodings[key.rpartition("/")[2]] = head["Metadata"][ENCODING]
    from hashlib import sha256

    zeros = sha256((outputs / "rootfs/usr/lib/libbig.so").read_bytes()).hexdigest()
    noise = sha256((outputs / "rootfs/usr/share/random.bin").read_bytes()).hexdigest()
    assert encodings[zeros] == ZLIB
    assert encodings[noise] == "identity"
    assert stored[store.location.blob_key(zeros)] < 100_000
    assert stored[store.location.blob_key(noise)] == (outputs / "rootfs/usr/share/random.bin").stat().st_size


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://bucket/prefix", "must look like s3://bucket/prefix"),
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("s3://ab/x", "not a valid S3 bucket name"),
        ("s3://bucket/a//b", "empty, '.' or '..' segment"),
        ("s3://bucket/a/../b", "empty, '.' or '..' segment"),
    ],
)
def test_a_bad_store_url_is_refused_with_its_reason(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace(".", r"\.").replace("(", r"\(")):
        parse_store_url(url)


def test_store_urls_parse() -> None:
    assert parse_store_url("s3://my.bucket-1").prefix == ""
    location = parse_store_url("s3://my-bucket/fleet/versions/")
    assert (location.bucket, location.prefix) == ("my-bucket", "fleet/versions")
    assert location.manifest_uri("a" * 64) == f"s3://my-bucket/fleet/versions/manifests/{'a' * 64}.json"
    assert location.manifest_sha(location.manifest_uri("a" * 64)) == "a" * 64
    with pytest.raises(ValueError, match="not a manifest of the object store"):
        location.manifest_sha(f"s3://other-bucket/fleet/versions/manifests/{'a' * 64}.json")
    with pytest.raises(ValueError, match="sha256"):
        location.manifest_sha("s3://my-bucket/fleet/versions/manifests/../x.json")


def test_relocate_snapshot_rewrites_only_the_rootfs(tmp_path: Path) -> None:
    from openmicrovm.runtime.driver import SnapshotError
    from openmicrovm.runtime.records import relocate_snapshot, write_private

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    built = tmp_path / "host-a" / "rootfs"
    built.mkdir(parents=True)
    meta = snapshot_meta(built)
    write_private(snapshot / SNAPSHOT_FILE, meta.to_json())
    moved = tmp_path / "host-b" / "rootfs"
    moved.mkdir(parents=True)
    relocate_snapshot(snapshot, moved)
    relocated = read_snapshot_meta(snapshot, "gvisor", GVisorSnapshotMeta)
    assert relocated.spec.rootfs == moved
    assert relocated.spec.process == meta.spec.process
    assert (relocated.token, relocated.footprint_bytes, relocated.runsc_version) == ("t0k3n", 123, "x")
    assert stat.S_IMODE(os.stat(snapshot / SNAPSHOT_FILE).st_mode) == 0o600
    (snapshot / SNAPSHOT_FILE).write_text("{not json")
    with pytest.raises(SnapshotError, match="corrupt"):
        relocate_snapshot(snapshot, moved)
    with pytest.raises(SnapshotError, match="missing"):
        relocate_snapshot(tmp_path / "nowhere", moved)


def test_the_store_comes_from_the_settings(aws_environment: dict[str, str]) -> None:
    from openmicrovm.config import Settings

    assert ObjectStore.from_settings(Settings()) is None
    store = ObjectStore.from_settings(
        Settings(snapshot_store_url="s3://fleet-bucket/v", snapshot_store_endpoint_url="http://127.0.0.1:9")
    )
    assert store is not None
    assert (store.location.bucket, store.location.prefix, store.endpoint_url) == (
        "fleet-bucket",
        "v",
        "http://127.0.0.1:9",
    )
    assert store.client.meta.region_name == "us-east-1"
    with pytest.raises(ValueError, match="must look like s3://bucket/prefix"):
        ObjectStore.from_settings(Settings(snapshot_store_url="fleet-bucket/v"))


def test_delete_prefix_empties_a_store(store: ObjectStore, tmp_path: Path) -> None:
    asyncio.run(publish(store, make_outputs(tmp_path / "outputs")))
    count = len(stored_objects(store))
    assert store.delete_prefix(store.location.key("")) == count > 10
    assert stored_objects(store) == {}
