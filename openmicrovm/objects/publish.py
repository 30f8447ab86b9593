"""Publishing a version's outputs: new blobs first, then the manifest that names them.

The manifest goes up last, so a manifest in the store always has every blob it needs: a host that
stops half-way leaves only unreferenced blobs behind, which the next publish of the same files
reuses. Nothing already stored is read or written again, which is what keeps the Debian base
tree (thousands of files, a few hundred MB) stored once for the whole store.
"""

from __future__ import annotations

import asyncio
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

from .client import ObjectStore
from .codec import COMPRESS_LEVEL, ENCODING, RAW, ZLIB, encode_file, pays
from .manifest import Manifest
from .scan import scan_tree
from .transfer import run_all

# Up to this many blobs a HEAD each is cheapest; beyond, one listing of the store's blobs (1000 keys
# a request) is: a first version has thousands of files, while a store holds a few base trees plus
# each version's own files, so the listing stays far shorter than a HEAD per file.
HEAD_EACH_UP_TO = 256


@dataclass(frozen=True)
class PublishedOutputs:
    manifest_uri: str  # s3://bucket/prefix/manifests/<sha256>.json: what fetch() takes
    manifest_sha256: str
    files: int  # regular files in the tree (each hard link counted)
    blobs: int  # distinct contents those files have
    new_blobs: int  # of which this publish uploaded
    referenced_bytes: int  # the blobs' bytes, uncompressed: what uploading the files whole would move
    uploaded_bytes: int  # blob bytes this publish stored (compressed where that paid)
    manifest_bytes: int  # the manifest object as stored
    new_manifest: bool  # False when the same tree had been published before

    @property
    def stored_bytes(self) -> int:
        """What this publish added to the store."""
        return self.uploaded_bytes + (self.manifest_bytes if self.new_manifest else 0)


async def publish(store: ObjectStore, output_dir: Path) -> PublishedOutputs:
    """Store a version's outputs directory (rootfs/, snapshot/, image-config.json) and return the
    manifest URI that fetch() on any host turns back into the same tree, with the figures.
    ObjectStoreError when the store cannot be reached or written, or the tree holds what no host
    would accept (ManifestInvalid: a device node, an xattr outside the published namespaces). The
    outputs must not change while this runs (they never do after a build)."""
    return await asyncio.to_thread(publish_blocking, store, output_dir)


def publish_blocking(store: ObjectStore, output_dir: Path) -> PublishedOutputs:
    """publish() for callers already in a thread."""
    tree = scan_tree(output_dir, store.workers)
    document = tree.manifest.to_json()
    # The checks fetch() applies, applied here first: a tree no host would accept is not published.
    Manifest.from_json(document, f"of {output_dir}")
    needed = tree.manifest.blobs()
    missing = sorted(set(needed) - _stored_blobs(store, needed))

    def upload(sha256: str) -> int:
        blob = encode_file(tree.sources[sha256], sha256, needed[sha256])
        try:
            store.put(store.location.blob_key(sha256), blob.body, {ENCODING: blob.encoding})
        finally:
            blob.close()
        return blob.stored_size

    uploaded = run_all(upload, missing, store.workers)
    manifest_sha = hashlib.sha256(document).hexdigest()
    compressed = zlib.compress(document, COMPRESS_LEVEL)
    body, encoding = (compressed, ZLIB) if pays(len(document), len(compressed)) else (document, RAW)
    new_manifest = store.put_if_absent(store.location.manifest_key(manifest_sha), body, {ENCODING: encoding})
    return PublishedOutputs(
        manifest_uri=store.location.manifest_uri(manifest_sha),
        manifest_sha256=manifest_sha,
        files=sum(1 for entry in tree.manifest.entries if entry.type == "file"),
        blobs=len(needed),
        new_blobs=len(missing),
        referenced_bytes=sum(needed.values()),
        uploaded_bytes=sum(uploaded),
        manifest_bytes=len(body),
        new_manifest=new_manifest,
    )


def _stored_blobs(store: ObjectStore, wanted: dict[str, int]) -> set[str]:
    """Which of the wanted blobs the store already holds."""
    if len(wanted) <= HEAD_EACH_UP_TO:
        present = run_all(lambda sha: store.exists(store.location.blob_key(sha)), wanted, store.workers)
        return {sha for sha, there in zip(wanted, present, strict=True) if there}
    prefix = store.location.blobs_prefix()
    listed = {key.rpartition("/")[2] for key in store.list_keys(prefix)}
    return listed & set(wanted)
