"""Image version outputs in an S3-compatible object store, so a version built on one host runs on
any other.

    store = ObjectStore.from_settings(settings)            # None when snapshot_store_url is empty
    published = await publish(store, output_dir)             # on the building host
    outputs = await fetch(store, published.manifest_uri, cache_root)   # on any host, cached

Content-addressed: each regular file's bytes are one blob named by their sha256, stored once for
the whole store (so the Debian base tree shared by every version is uploaded once), and each
version is one manifest naming its blobs with every entry's metadata (owners, modes, xattrs,
links, times). Modules: location (URLs and keys), client (boto3), codec (compression and
checking), manifest (the format and its safety checks), scan and publish (building host),
cache, materialise, reuse and fetch (running host), transfer (the thread pool).
"""

from .client import ObjectStore
from .errors import ObjectMissing, ObjectStoreError
from .fetch import Relocate, fetch, fetch_blocking
from .location import StoreLocation, parse_store_url
from .publish import PublishedOutputs, publish, publish_blocking

__all__ = [
    "ObjectMissing",
    "ObjectStore",
    "ObjectStoreError",
    "PublishedOutputs",
    "Relocate",
    "StoreLocation",
    "fetch",
    "fetch_blocking",
    "parse_store_url",
    "publish",
    "publish_blocking",
]
