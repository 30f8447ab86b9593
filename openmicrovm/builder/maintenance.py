"""Housekeeping of the build storage: what a crashed server left behind, and the layer cache."""

from __future__ import annotations

from pathlib import Path

from openmicrovm.builder.build_network import cleanup_build_networks
from openmicrovm.builder.buildah import buildah_output, list_containers, open_store, run_buildah


async def cleanup_build_strays(cache_dir: Path) -> list[str]:
    """Remove every buildah container (and its mount) in our storage; returns their names.
    Only call it while no build runs, e.g. at server start before builds are resumed: a crash
    mid-build leaves the export container and buildah's own working containers behind. Also
    removes the build networks no live build holds (cleanup_build_networks, safe at any time)."""
    await cleanup_build_networks()
    store = await open_store(cache_dir)
    containers = await list_containers(store)
    names = [str(item.get("containername") or item.get("id")) for item in containers]
    if names:
        await run_buildah(store, ["rm", "--all"])
    return names


async def prune_build_cache(cache_dir: Path) -> int:
    """Drop cached build layers no tagged image uses (the base image stays); returns how many
    images were removed. Versions already built are unaffected: their root filesystems hold
    their own links to the files."""
    store = await open_store(cache_dir)
    removed = await buildah_output(store, ["rmi", "--prune"])
    return sum(1 for line in removed.splitlines() if len(line.strip()) == 64)
