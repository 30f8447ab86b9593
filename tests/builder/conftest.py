"""Fixtures for builder tests: a build cache of the session's own (so tests see only their own
buildah containers and mounts) that reuses the machine's cached Debian base rootfs."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from openmicrovm.builder.base_image import ensure_base_image
from openmicrovm.builder.base_rootfs import ensure_base_rootfs
from openmicrovm.builder.buildah import BuildahStore, list_containers, open_store, run_buildah
from openmicrovm.config import default_cache_dir


@pytest.fixture(scope="session")
def builder_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache dir whose base/ points at the shared base rootfs (debootstrap takes a minute)."""
    shared = default_cache_dir()
    ensure_base_rootfs(shared, print)
    cache = tmp_path_factory.mktemp("builder-cache")
    (cache / "base").symlink_to(shared / "base", target_is_directory=True)
    yield cache
    store = asyncio.run(open_store(cache))
    leftovers = asyncio.run(list_containers(store))
    if leftovers:  # unmount before deleting, so nothing is removed through a live mount
        asyncio.run(run_buildah(store, ["rm", "--all"]))
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(store.runroot, ignore_errors=True)
    assert not leftovers, f"buildah containers left behind: {leftovers}"


@pytest.fixture(scope="session")
def store(builder_cache: Path) -> BuildahStore:
    """The session's buildah storage with the managed base image imported (the cold import)."""

    messages: list[str] = []

    async def prepare() -> BuildahStore:
        opened = await open_store(builder_cache)
        # Two builds arriving at once on a fresh storage: the lock lets only one import.
        await asyncio.gather(*(ensure_base_image(opened, builder_cache, messages.append) for _ in range(2)))
        return opened

    started = time.monotonic()
    prepared = asyncio.run(prepare())
    print(f"cold base image import: {time.monotonic() - started:.1f} s; {messages}")
    assert sum("importing the managed base image" in message for message in messages) == 1, messages
    return prepared


def mounts_below(path: Path) -> list[str]:
    """Mount points below `path` (overlay mounts of buildah containers)."""
    prefix = str(path.resolve())
    points = [line.split(" ")[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [point for point in points if point.startswith(prefix)]


def assert_store_clean(store: BuildahStore) -> None:
    containers = asyncio.run(list_containers(store))
    assert containers == [], f"buildah containers left behind: {containers}"
    assert mounts_below(store.root) == [], "buildah mounts left behind"
