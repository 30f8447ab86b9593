"""Bytes the object store holds per image version of the sample app, beside uploading each
version whole, and what a second host downloads to run them.

    .venv/bin/python bench/bench_version_store.py [--driver auto] [--keep]
    .venv/bin/python bench/bench_version_store.py --outputs DIR [DIR ...]

Without --outputs it builds two versions of examples/sample-app for real (the pipeline of
bench_build.py: Dockerfile, rootfs export, app start, ready hook, snapshot; the second version
with app.py changed), then publishes both to a moto S3 server on 127.0.0.1. With --outputs it
publishes existing version output directories instead (e.g. <data dir>/builds/<build id>), in
the order given.

Baselines, measured on the same trees in the same run:
  whole       the outputs directory's apparent size (every inode once): uploading it as it is
  whole, z    the same files each zlib-compressed as the store does, without sharing between
              versions: a per-version compressed archive
Then a second host (an empty cache) fetches version 1 and version 2: bytes downloaded each time,
against the compressed size of the whole version.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from openmicrovm.builder.outputs import tree_size  # noqa: E402
from openmicrovm.objects import ObjectStore, PublishedOutputs, fetch, publish  # noqa: E402
from openmicrovm.objects.manifest import Manifest  # noqa: E402
from openmicrovm.runtime.records import SNAPSHOT_FILE  # noqa: E402
from tests.objects.trees import describe  # noqa: E402
from tests.support.moto import MotoServer  # noqa: E402

MB = 1e6
META = f"snapshot/{SNAPSHOT_FILE}"  # relocated on fetch: compared by the tests, not here


async def build_two_versions(root: Path, driver_name: str) -> tuple[list[Path], Any, Path]:
    from bench.bench_build import one_build, sample_zip
    from openmicrovm.builder.base_rootfs import ensure_base_rootfs
    from openmicrovm.config import default_cache_dir
    from openmicrovm.runtime import make_driver

    shared = default_cache_dir()
    await asyncio.to_thread(ensure_base_rootfs, shared, print)
    cache = root / "cache"
    cache.mkdir()
    (cache / "base").symlink_to(shared / "base", target_is_directory=True)
    driver = make_driver(driver_name, root / "sandboxes", cache)
    outputs = []
    for number in (1, 2):
        artifact = sample_zip(root / f"v{number}.zip", f"version {number}")
        seconds, result = await one_build(driver, root, cache, artifact)
        print(f"built version {number} in {seconds:.1f} s ({driver.name} driver)")
        outputs.append(result.rootfs_path.parent)
    return outputs, driver, cache


def compressed_whole(store: ObjectStore, manifest: Manifest, sizes: dict[str, int]) -> int:
    """Every file of the version, compressed as the store compresses it, with no sharing."""
    return sum(sizes[store.location.blob_key(sha)] for sha in manifest.blobs())


def stored_sizes(store: ObjectStore) -> dict[str, int]:
    sizes = {}
    paginator = store.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=store.location.bucket):
        for item in page.get("Contents", ()):
            sizes[item["Key"]] = item["Size"]
    return sizes


class DownloadMeter:
    def __init__(self, store: ObjectStore) -> None:
        self.bytes = 0
        self.requests = 0
        store.client.meta.events.register("after-call.s3.GetObject", self._count)

    def _count(self, parsed: dict[str, Any], **_: Any) -> None:
        self.requests += 1
        self.bytes += int(parsed.get("ContentLength") or 0)


async def read_manifest(store: ObjectStore, result: PublishedOutputs) -> tuple[Manifest, int]:
    """A published version's manifest and its stored size."""
    from openmicrovm.objects.codec import decode_bytes

    def read() -> tuple[Manifest, int]:
        with store.open(store.location.manifest_key(result.manifest_sha256)) as stored:
            document = decode_bytes(stored, result.manifest_sha256, 1 << 30)
            return Manifest.from_json(document, result.manifest_uri), stored.size

    return await asyncio.to_thread(read)


async def measure(store: ObjectStore, outputs: list[Path], scratch: Path) -> list[Path]:
    versions = []
    for directory in outputs:
        started = time.perf_counter()
        result = await publish(store, directory)
        versions.append((directory, result, time.perf_counter() - started))
    sizes = stored_sizes(store)
    whole, whole_z = [], []
    for directory, result, _ in versions:
        manifest, manifest_size = await read_manifest(store, result)
        whole.append(tree_size(directory))
        whole_z.append(compressed_whole(store, manifest, sizes) + manifest_size)
    print()
    print(
        f"{'version':<9}{'files':>7}{'blobs':>7}{'new':>6}{'whole MB':>10}{'whole,z MB':>12}"
        f"{'stored MB':>11}{'manifest kB':>13}{'publish s':>11}"
    )
    for number, (_, result, seconds) in enumerate(versions, 1):
        print(
            f"{number:<9}{result.files:>7}{result.blobs:>7}{result.new_blobs:>6}{whole[number - 1] / MB:>10.1f}"
            f"{whole_z[number - 1] / MB:>12.1f}{result.stored_bytes / MB:>11.3f}"
            f"{result.manifest_bytes / 1e3:>13.1f}{seconds:>11.1f}"
        )
    stored = [result.stored_bytes for _, result, _ in versions]
    print(f"{'all':<29}{sum(whole) / MB:>10.1f}{sum(whole_z) / MB:>12.1f}{sum(stored) / MB:>11.3f}")
    print(f"the bucket holds {sum(sizes.values()) / MB:.1f} MB in {len(sizes)} objects")
    for number in range(1, len(versions)):
        print(
            f"version {number + 1} stores {stored[number] / MB:.3f} MB: {whole[number] / stored[number]:.0f}x less "
            f"than uploading it whole, {whole_z[number] / stored[number]:.0f}x less than whole and compressed"
        )
    print()
    host_b = scratch / "host-b-cache"
    meter = DownloadMeter(store)
    fetched_trees = []
    for number, (directory, result, _) in enumerate(versions, 1):
        before_bytes, before_requests = meter.bytes, meter.requests
        started = time.perf_counter()
        fetched = await fetch(store, result.manifest_uri, host_b)
        seconds = time.perf_counter() - started
        same = describe(fetched, skip=(META,)) == describe(directory, skip=(META,))
        print(
            f"host B fetches version {number}: {(meter.bytes - before_bytes) / MB:.2f} MB in "
            f"{meter.requests - before_requests} GETs, {seconds:.1f} s (the whole version compressed: "
            f"{whole_z[number - 1] / MB:.1f} MB); identical to the built tree: {'yes' if same else 'NO'}"
        )
        fetched_trees.append(fetched)
    print(f"host B's cache uses {disk_usage(host_b) / MB:.1f} MB of disk for {len(versions)} versions")
    return fetched_trees


async def run_fetched(driver: Any, tree: Path) -> None:
    """Restore the fetched snapshot (its rootfs now host B's path) and ask the app for /."""
    from openmicrovm.builder.outputs import SNAPSHOT_DIR

    started = time.perf_counter()
    sandbox = await driver.restore("bench-host-b", tree / SNAPSHOT_DIR)
    try:
        reader, writer = await driver.connect(sandbox, 8080)
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode()
        print(
            f"a sandbox restored from host B's copy (rootfs {sandbox.spec.rootfs}) answered in "
            f"{time.perf_counter() - started:.2f} s: {status}, {body[:100].decode(errors='replace')}"
        )
    finally:
        await driver.destroy(sandbox)


def disk_usage(path: Path) -> int:
    """Allocated bytes below `path`, each inode once (trees share base files by hard links)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for info in (item.lstat() for item in [path, *path.rglob("*")]):
        if (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total


async def main(arguments: argparse.Namespace) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="openmicrovm-bench-store-"))
    moto = MotoServer(scratch / "moto.log")
    moto.start()
    driver = cache = None
    try:
        if arguments.outputs:
            outputs = [Path(path) for path in arguments.outputs]
        else:
            outputs, driver, cache = await build_two_versions(scratch, arguments.driver)
        moto.client("s3").create_bucket(Bucket="versions")
        store = ObjectStore("s3://versions/fleet", moto.url)
        print(f"store {store.url} on {moto.url}; scratch {scratch}")
        fetched = await measure(store, outputs, scratch)
        if driver is not None and driver.capabilities.memory_snapshot:
            await run_fetched(driver, fetched[-1])
        return 0
    finally:
        moto.stop()
        if driver is not None:
            from openmicrovm.builder.buildah import open_store
            from openmicrovm.builder.maintenance import cleanup_build_strays

            await driver.cleanup_strays(set())
            await cleanup_build_strays(cache)
            if not arguments.keep:
                buildah = await open_store(cache)
                shutil.rmtree(buildah.runroot, ignore_errors=True)
        if not arguments.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--driver", default="auto")
    parser.add_argument("--outputs", nargs="+", help="publish these version output dirs instead of building")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    arguments = parser.parse_args()
    for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
        os.environ.setdefault(name, value)  # moto accepts any; a real store uses the usual chain
    sys.exit(asyncio.run(main(arguments)))
