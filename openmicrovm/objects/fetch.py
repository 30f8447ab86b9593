"""Fetching a published version onto this host: once, whole, checked, and relocated.

fetch() returns <cache root>/<manifest sha256>/, a copy of the outputs directory the building host
published (rootfs/, snapshot/, image-config.json) with the snapshot's meta file pointing at the
copy's own rootfs. The tree is made in a private partial directory by whoever holds the
manifest's lock (threads and processes alike), flushed to disk, then renamed into place: a tree
under its final name is always complete, so the fast path needs no lock at all. Any failure
removes the partial tree and raises ObjectStoreError.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from openmicrovm.builder.outputs import ROOTFS_DIR, SNAPSHOT_DIR
from openmicrovm.private_files import write_private_file
from openmicrovm.runtime.driver import SnapshotError
from openmicrovm.runtime.records import SNAPSHOT_FILE, relocate_snapshot

from . import cache
from .client import ObjectStore
from .codec import BlobCorrupt, decode_bytes, decode_into
from .errors import ObjectMissing, ObjectStoreError
from .files import create_file
from .manifest import DIR, FILE, Entry, Manifest
from .materialise import apply_metadata, build_tree, seal_directories
from .reuse import LocalFiles

# Relocate(snapshot dir, rootfs): point a fetched snapshot at the fetched root filesystem.
Relocate = Callable[[Path, Path], None]
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
DOWNLOAD_ATTEMPTS = 3
REPUBLISH = "publish the version again from a host that has its outputs"


async def fetch(
    store: ObjectStore, manifest_uri: str, cache_root: Path, *, relocate: Relocate | None = relocate_snapshot
) -> Path:
    """The version's outputs directory on this host (<cache_root>/<manifest sha256>), fetching it
    first if this host has none. ValueError for a URI that is not a manifest of `store`;
    ObjectStoreError when the store is unreachable or the version is missing, corrupt or refused
    there. Cancelling the caller does not stop a fetch under way: it completes (or fails and
    cleans up) in its thread, and the next call finds its tree."""
    return await asyncio.to_thread(fetch_blocking, store, manifest_uri, cache_root, relocate=relocate)


def fetch_blocking(
    store: ObjectStore, manifest_uri: str, cache_root: Path, *, relocate: Relocate | None = relocate_snapshot
) -> Path:
    """fetch() for callers already in a thread (or another process)."""
    sha256 = store.location.manifest_sha(manifest_uri)
    final = cache.tree_path(cache_root, sha256)
    if final.is_dir():
        return final
    cache.prepare(cache_root)
    with cache.locked(cache.lock_path(cache_root, sha256)):
        if final.is_dir():  # fetched by whoever held the lock before us
            return final
        partial = cache.partial_path(cache_root, sha256)
        shutil.rmtree(partial, ignore_errors=True)  # left by a fetcher that died
        document, manifest = _load_manifest(store, manifest_uri, sha256)
        try:
            os.mkdir(partial, 0o700)
            blobs = _BlobSource(store, manifest_uri, LocalFiles.in_cache(cache_root))
            build_tree(manifest, partial, blobs, store.workers)
            if relocate is not None:
                _relocate(manifest, partial, final, relocate)
            seal_directories(manifest, partial)
            write_private_file(cache.manifest_copy_path(cache_root, sha256), document)
            cache.make_durable(partial)
            os.rename(partial, final)
            cache.fsync_directory(cache_root)
        except BaseException as error:
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(error, OSError):
                raise ObjectStoreError(
                    f"cannot make the fetched copy of {manifest_uri} in {cache_root}: {error}"
                ) from error
            raise
    return final


def _load_manifest(store: ObjectStore, manifest_uri: str, sha256: str) -> tuple[bytes, Manifest]:
    try:
        with store.open(store.location.manifest_key(sha256)) as stored:
            document = decode_bytes(stored, sha256, MAX_MANIFEST_BYTES)
    except ObjectMissing:
        raise ObjectStoreError(
            f"manifest {manifest_uri} is not in the object store: the version was never published "
            f"there or has been removed; check snapshot_store_url, or {REPUBLISH}"
        ) from None
    except BlobCorrupt as error:
        raise ObjectStoreError(
            f"manifest {manifest_uri} is corrupt ({error}); delete it and {REPUBLISH}"
        ) from None
    return document, Manifest.from_json(document, manifest_uri)


class _BlobSource:
    """Bytes for the tree: from this host's earlier trees when they have them, else the store."""

    def __init__(self, store: ObjectStore, manifest_uri: str, local: LocalFiles) -> None:
        self.store = store
        self.manifest_uri = manifest_uri
        self.local = local

    def link_identical(self, entry: Entry, destination: Path) -> bool:
        return self.local.link_identical(entry, destination)

    def write(self, entry: Entry, destination: Path) -> None:
        if self.local.copy(entry, destination):
            return
        key = self.store.location.blob_key(entry.sha256)
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                with self.store.open(key) as stored, create_file(destination) as out:
                    decode_into(stored, entry.sha256, entry.size, out)
                return
            except ObjectMissing:
                raise ObjectStoreError(
                    f"blob {entry.sha256} ({entry.path} of {self.manifest_uri}) is missing from the "
                    f"object store, so that version is incomplete there; {REPUBLISH}"
                ) from None
            except BlobCorrupt as error:
                raise ObjectStoreError(
                    f"blob for {entry.path} of {self.manifest_uri} is corrupt in the object store: "
                    f"{error}. Delete s3://{self.store.location.bucket}/{key} and {REPUBLISH} (publish "
                    "uploads the blobs that are missing)"
                ) from None
            except ObjectStoreError:
                # botocore retries a request, not a body cut off half-way: start the blob again.
                destination.unlink(missing_ok=True)
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise


def _relocate(manifest: Manifest, partial: Path, final: Path, relocate: Relocate) -> None:
    """The snapshot's meta file names the building host's rootfs path: make it name ours, keeping
    the file's owner, mode and times as published."""
    kinds = {entry.path: entry for entry in manifest.entries}
    meta = kinds.get(f"{SNAPSHOT_DIR}/{SNAPSHOT_FILE}")
    snapshot = kinds.get(SNAPSHOT_DIR)
    if meta is None or meta.type != FILE or snapshot is None or snapshot.type != DIR:
        return  # outputs without a snapshot (a failed build's, a test tree's)
    try:
        relocate(partial / SNAPSHOT_DIR, final / ROOTFS_DIR)
    except SnapshotError as error:
        raise ObjectStoreError(f"the snapshot of {final.name} cannot be relocated: {error}") from None
    apply_metadata(partial / meta.path, meta)
