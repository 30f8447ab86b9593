"""Runs image builds in the background and reports to the service (the BuildEngine seam).

Builds run at most `quotas.concurrent_builds` at a time; the rest wait PENDING. A build that was
running when the server stopped is started again from the beginning at the next start, so no
build stays IN_PROGRESS forever.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

from openmicrovm.builder.build_network import allowed_networks
from openmicrovm.builder.errors import INTERNAL_PLATFORM_ERROR, BuildFailed
from openmicrovm.builder.outputs import delete_build_outputs_async
from openmicrovm.builder.pipeline import BuildRequest, run_build
from openmicrovm.builder.unpack import UnpackLimits
from openmicrovm.logs.store import LogStore
from openmicrovm.runtime.driver import SandboxDriver
from openmicrovm.service import builds as build_records
from openmicrovm.service import versions as version_records
from openmicrovm.service.core import Service
from openmicrovm.service.image_config import memory_mib
from openmicrovm.states import ImageState, VersionState
from openmicrovm.store import Tx
from openmicrovm.store.records import Build

log = logging.getLogger("openmicrovm.builds")


class BuildEngine:
    def __init__(self, service: Service, driver: SandboxDriver, logs: LogStore) -> None:
        self.service = service
        self.driver = driver
        self.logs = logs
        self.builds_dir = service.settings.data_dir / "builds"
        self.work_dir = service.settings.data_dir / "work"
        self._slots = asyncio.Semaphore(max(service.settings.quotas.concurrent_builds, 1))
        # Parsed once, here, so that an invalid entry stops the server at start (EgressSettingError)
        # rather than failing every build.
        self.egress_allow = allowed_networks(service.settings.egress_allow_networks)
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[str, asyncio.Task[None]] = {}

    # -- the seam -------------------------------------------------------------------------------
    def schedule_build(self, build_id: str) -> None:
        if build_id not in self._running:
            self._running[build_id] = self._spawn(self._build(build_id))

    def schedule_version_deletion(self, image_arn: str, version_number: int) -> None:
        self._spawn(self._delete_version(image_arn, version_number))

    def schedule_image_deletion(self, image_arn: str) -> None:
        self._spawn(self._delete_image(image_arn))

    # -- start-up and shut-down ----------------------------------------------------------------
    async def resume_pending_work(self) -> None:
        """Restart interrupted builds and finish interrupted deletions (called at start-up)."""

        def pending(tx: Tx) -> tuple[list[str], list[str], list[tuple[str, int]]]:
            deleting_images = tx.images.arns_in_state(ImageState.DELETING)
            deleting_versions = [
                (version.image_arn, version.number)
                for version in tx.versions.in_state(VersionState.DELETING)
                if version.image_arn not in deleting_images
            ]
            return tx.builds.unfinished_ids(), deleting_images, deleting_versions

        builds, images, versions = await self.service.persist(self.service.read, pending)
        for build_id in builds:
            self.schedule_build(build_id)
        for arn in images:
            self.schedule_image_deletion(arn)
        for arn, number in versions:
            self.schedule_version_deletion(arn, number)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- building ------------------------------------------------------------------------------
    def output_dir(self, build_id: str) -> Path:
        return self.builds_dir / build_id

    async def _build(self, build_id: str) -> None:
        try:
            async with self._slots:
                await self._build_now(build_id)
        finally:
            self._running.pop(build_id, None)

    async def _build_now(self, build_id: str) -> None:
        job = await self.service.persist(self.service.read, lambda tx: tx.builds.job(build_id))
        if job is None or not await self.service.persist(build_records.build_started, self.service, build_id):
            return
        stream = f"builds/{build_id}"
        logging_disabled = "disabled" in (job.config.get("logging") or {})

        def write(line: str) -> None:
            if not logging_disabled:
                self.logs.append(stream, line)

        output = self.output_dir(build_id)
        work = self.work_dir / build_id
        # A build interrupted by a restart starts over from a clean slate.
        shutil.rmtree(work, ignore_errors=True)
        await delete_build_outputs_async(output)
        request = BuildRequest(
            build_id=build_id,
            image_arn=job.build.image_arn,
            image_name=job.image_name,
            image_version=job.version,
            region=job.region,
            architecture=job.build.architecture,
            code_uri=job.config["codeArtifact"]["uri"],
            environment=dict(job.config.get("environmentVariables") or {}),
            hooks=job.config.get("hooks"),
            memory_mib=memory_mib(job.config),
            all_capabilities="ALL" in (job.config.get("additionalOsCapabilities") or []),
            work_dir=work,
            output_dir=output,
            cache_dir=self.service.settings.cache_dir,
            artifact_file_roots=self.service.settings.effective_artifact_file_roots,
            limits=UnpackLimits(
                max_total_bytes=self.service.settings.max_artifact_bytes,
                max_files=self.service.settings.max_artifact_files,
            ),
            dockerfile_timeout_seconds=self.service.settings.max_dockerfile_build_seconds,
            egress_allow_networks=self.egress_allow,
        )
        write(
            f"build {build_id} of {job.build.image_arn} version {job.version} ({job.build.architecture}) started"
        )
        try:
            result = await run_build(request, self.driver, write, lambda stage: write(f"stage: {stage}"))
        except BuildFailed as failure:
            write(f"build failed: {failure.state_reason}")
            await self.service.persist(
                build_records.build_finished, self.service, build_id, False, failure.state_reason, None
            )
            await delete_build_outputs_async(output)
            return
        except asyncio.CancelledError:
            raise  # server shutting down: the build is restarted at the next start
        except Exception as error:
            log.exception("build %s crashed", build_id)
            reason = (
                f"{INTERNAL_PLATFORM_ERROR}: the build stopped on an internal error ({error}); try again."
            )
            write(f"build failed: {reason}")
            await self.service.persist(
                build_records.build_finished, self.service, build_id, False, reason, None
            )
            await delete_build_outputs_async(output)
            return
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write("build succeeded")
        await self.service.persist(
            build_records.build_finished, self.service, build_id, True, None, result.to_record()
        )

    # -- deleting ------------------------------------------------------------------------------
    async def _delete_builds(self, builds: list[Build]) -> None:
        for build in builds:
            running = self._running.get(build.build_id)
            if running is not None:
                running.cancel()
            await delete_build_outputs_async(self.output_dir(build.build_id))
            self.logs.delete(f"builds/{build.build_id}")

    async def _delete_version(self, image_arn: str, number: int) -> None:
        await self._delete_builds(
            await self.service.persist(self.service.read, lambda tx: tx.builds.of_version(image_arn, number))
        )
        await self.service.persist(version_records.version_deleted, self.service, image_arn, number)

    async def _delete_image(self, image_arn: str) -> None:
        await self._delete_builds(
            await self.service.persist(self.service.read, lambda tx: tx.builds.of_image(image_arn))
        )
        await self.service.persist(version_records.image_deleted, self.service, image_arn)
