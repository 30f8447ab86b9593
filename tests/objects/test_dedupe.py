"""Content addressing: the bytes two versions share are stored once, and a host that fetched one
version downloads only the other's own files."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from openmicrovm.objects import ObjectStore, fetch, publish
from tests.objects.conftest import CallCounter, stored_objects
from tests.objects.trees import MIB, describe, make_outputs


def _blob_keys(store: ObjectStore) -> dict[str, int]:
    return {key: size for key, size in stored_objects(store).items() if "/blobs/" in key}


def test_a_second_version_stores_only_its_own_files(store: ObjectStore, tmp_path: Path) -> None:
    first_dir = make_outputs(tmp_path / "v1")
    second_dir = make_outputs(
        tmp_path / "v2", app_text="print('version 2')\n", extra={"app/new.bin": os.urandom(MIB)}
    )
    first = asyncio.run(publish(store, first_dir))
    after_first = _blob_keys(store)
    assert first.new_blobs == first.blobs == len(after_first)
    assert first.uploaded_bytes == sum(after_first.values())

    second = asyncio.run(publish(store, second_dir))
    after_second = _blob_keys(store)
    # Its own: app.py, new.bin, the memory image (which holds the app's text) and the snapshot
    # meta file (another token, another rootfs path); nothing else.
    assert second.new_blobs == 4
    assert len(after_second) == len(after_first) + 4
    assert second.uploaded_bytes == sum(after_second.values()) - sum(after_first.values())
    assert second.referenced_bytes > 19 * MIB  # the base's large files are still referenced ...
    assert second.uploaded_bytes < 1.1 * MIB  # ... and not uploaded again (new.bin is 1 MiB of noise)
    # Each content is in the store once, under its own hash.
    for name in ("usr/lib/libbig.so", "usr/share/random.bin", "etc/copy-of-app.conf"):
        sha = hashlib.sha256((first_dir / "rootfs" / name).read_bytes()).hexdigest()
        assert [key for key in after_second if key.endswith(sha)] == [store.location.blob_key(sha)]
    manifests = [key for key in stored_objects(store) if "/manifests/" in key]
    assert sorted(manifests) == sorted(
        store.location.manifest_key(result.manifest_sha256) for result in (first, second)
    )

    again = asyncio.run(publish(store, first_dir))
    assert (again.manifest_uri, again.new_blobs, again.stored_bytes) == (first.manifest_uri, 0, 0)


def test_where_the_outputs_lie_is_not_part_of_a_version(store: ObjectStore, tmp_path: Path) -> None:
    """The outputs dir's own path (a build id, a host's data dir) is not in the manifest; only the
    snapshot meta file names it, and that is one small blob."""
    from openmicrovm.runtime.records import SNAPSHOT_FILE, write_private
    from tests.objects.trees import snapshot_meta

    one = make_outputs(tmp_path / "one")
    first = asyncio.run(publish(store, one))
    other = tmp_path / "other"
    os.rename(one, other)
    moved = asyncio.run(publish(store, other))
    assert (moved.manifest_uri, moved.new_blobs) == (first.manifest_uri, 0)
    # As if built at `elsewhere`: the meta file names that rootfs (same mtime, to isolate the path).
    meta = other / "snapshot" / SNAPSHOT_FILE
    stamp = os.lstat(meta).st_mtime_ns
    write_private(meta, snapshot_meta(tmp_path / "elsewhere" / "rootfs").to_json())
    os.utime(meta, ns=(stamp, stamp))
    second = asyncio.run(publish(store, other))
    assert second.new_blobs == 1  # only the meta file differs
    assert second.manifest_uri != first.manifest_uri


def test_a_host_downloads_only_what_it_does_not_have(store: ObjectStore, tmp_path: Path) -> None:
    first = asyncio.run(publish(store, make_outputs(tmp_path / "v1")))
    second_dir = make_outputs(tmp_path / "v2", app_text="print('v2')\n", extra={"app/x": b"x"})
    second = asyncio.run(publish(store, second_dir))
    cache_root = tmp_path / "cache"
    one = asyncio.run(fetch(store, first.manifest_uri, cache_root))
    gets = CallCounter(store, "GetObject")
    two = asyncio.run(fetch(store, second.manifest_uri, cache_root))
    # The manifest and the version's own blobs (app.py, app/x, the memory image, the meta file).
    assert gets.count == 1 + second.new_blobs == 5
    # A base file with the same owner, mode and times is shared, not stored twice on this host.
    assert (
        os.lstat(one / "rootfs/usr/lib/libbig.so").st_ino == os.lstat(two / "rootfs/usr/lib/libbig.so").st_ino
    )
    # Still exactly the published tree: files distinct there (twin-1, twin-2) are distinct here.
    skip = ("snapshot/snapshot.json",)
    assert describe(two, skip=skip) == describe(second_dir, skip=skip)
    assert describe(one, skip=skip) == describe(tmp_path / "v1", skip=skip)
