"""Where a host finds an image version's outputs: the directory its own build left, or a copy
fetched from the snapshot store (snapshot_store_url) and cached, so that a version built on one
host runs on any other. The building host publishes them there before the version succeeds."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openmicrovm.builder.outputs import SNAPSHOT_DIR
from openmicrovm.objects import ObjectStore, ObjectStoreError, fetch, publish
from openmicrovm.runtime.driver import SnapshotError
from openmicrovm.service.core import Service
from openmicrovm.states import BuildState
from openmicrovm.store.records import Build

log = logging.getLogger("openmicrovm.outputs")
# The builds' artifacts members written here.
OUTPUTS_MANIFEST = "outputsManifest"
OUTPUTS_STORED_BYTES = "outputsStoredBytes"


class VersionOutputs:
    def __init__(self, service: Service, host_id: str, builds_dir: Path, cache_dir: Path) -> None:
        self.service = service
        self.host_id = host_id
        self.builds_dir = builds_dir
        self.cache_dir = cache_dir  # fetched copies, one directory per manifest
        self.store = ObjectStore.from_settings(service.settings)

    async def publish(self, output_dir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
        """Upload a finished build's outputs (when a snapshot store is configured); the members to
        add to the build's artifacts. Raises ObjectStoreError."""
        if self.store is None:
            return {}
        progress(f"publishing the outputs to {self.service.settings.snapshot_store_url}")
        published = await publish(self.store, output_dir)
        progress(
            f"published: {published.new_blobs} new of {published.blobs} files' contents, "
            f"{published.stored_bytes} bytes stored"
        )
        return {OUTPUTS_MANIFEST: published.manifest_uri, OUTPUTS_STORED_BYTES: published.stored_bytes}

    async def snapshot_dir(self, image_arn: str, version_number: int, architecture: str) -> Path | None:
        """The version's snapshot on this host: its own build's, or a fetched copy. None when the
        version has no successful build for this architecture. Raises SnapshotError when the
        outputs are elsewhere and cannot be fetched."""

        def builds() -> list[Build]:
            return [
                build
                for build in self.service.read(lambda tx: tx.builds.of_version(image_arn, version_number))
                if build.state is BuildState.SUCCESSFUL
                and build.artifacts
                and build.architecture == architecture
            ]

        found = await self.service.persist(builds)
        if not found:
            return None
        for build in found:
            assert build.artifacts is not None
            local = Path(build.artifacts["snapshotDir"])
            if build.host_id in (self.host_id, None) and local.is_dir():
                return local
        manifests = [build.artifacts.get(OUTPUTS_MANIFEST) for build in found if build.artifacts]
        manifest = next((uri for uri in manifests if uri), None)
        if manifest is None or self.store is None:
            raise SnapshotError(
                "the image version's outputs are on another host and no snapshot store holds them "
                "(set snapshot_store_url on every host, then build the version again)"
            )
        try:
            tree = await fetch(self.store, manifest, self.cache_dir)
        except (ObjectStoreError, ValueError) as error:
            raise SnapshotError(
                f"the image version's outputs could not be fetched from {manifest}: {error}"
            ) from None
        await self.service.persist(
            self.service.transact, lambda tx: tx.hosts.add_version(self.host_id, image_arn, version_number)
        )
        return tree / SNAPSHOT_DIR
