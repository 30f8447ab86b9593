"""Two fetches of one manifest at once, in threads or in processes: one downloads, both get the
same tree."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from openmicrovm.objects import ObjectStore, fetch, publish
from openmicrovm.objects.cache import lock_path, locked, prepare
from tests.objects.conftest import CallCounter
from tests.objects.trees import describe, make_outputs

REPO = Path(__file__).resolve().parents[2]


def _fetch_twice_in_threads(store: ObjectStore, uri: str, cache_root: Path) -> list[Path]:
    async def both() -> list[Path]:
        return list(await asyncio.gather(fetch(store, uri, cache_root), fetch(store, uri, cache_root)))

    return asyncio.run(both())


def test_concurrent_fetches_in_threads_download_once(store: ObjectStore, tmp_path: Path) -> None:
    outputs = make_outputs(tmp_path / "outputs")
    published = asyncio.run(publish(store, outputs))
    cache_root = tmp_path / "cache"
    prepare(cache_root)
    gets = CallCounter(store, "GetObject")
    results: list[Path] = []
    # Both fetches start while the manifest's lock is held, so they surely contend for it.
    with locked(lock_path(cache_root, published.manifest_sha256)):
        worker = threading.Thread(
            target=lambda: results.extend(_fetch_twice_in_threads(store, published.manifest_uri, cache_root))
        )
        worker.start()
        time.sleep(0.3)  # let both reach the lock (correctness does not depend on it)
    worker.join()
    assert results == [cache_root / published.manifest_sha256] * 2
    assert gets.count == 1 + published.blobs
    skip = ("snapshot/snapshot.json",)
    assert describe(results[0], skip=skip) == describe(outputs, skip=skip)


def test_concurrent_fetches_in_processes_download_once(
    store: ObjectStore, tmp_path: Path, aws_environment: dict[str, str]
) -> None:
    published = asyncio.run(publish(store, make_outputs(tmp_path / "outputs")))
    cache_root = tmp_path / "cache"
    prepare(cache_root)
    command = [
        sys.executable,
        "-m",
        "tests.objects.fetcher",
        store.url,
        store.endpoint_url,
        published.manifest_uri,
        str(cache_root),
    ]
    environment = {**os.environ, **aws_environment, "PYTHONPATH": str(REPO)}
    with locked(lock_path(cache_root, published.manifest_sha256)):
        processes = [
            subprocess.Popen(
                command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for _ in range(2)
        ]
        time.sleep(0.5)  # let both reach the lock (correctness does not depend on it)
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()
        reports.append(json.loads(out))
    assert [report["path"] for report in reports] == [str(cache_root / published.manifest_sha256)] * 2
    assert sum(report["gets"] for report in reports) == 1 + published.blobs
