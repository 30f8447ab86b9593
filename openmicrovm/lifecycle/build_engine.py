"""Runs the builds this host took (cluster/agent.py claims them) and reports to the service.

Builds run at most `quotas.concurrent_builds` at a time on a host; the rest wait PENDING for a
host with a free slot. A build that was running when the agent stopped is started again from the
beginning at the next start, so no build stays IN_PROGRESS forever.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openmicrovm.builder.errors import INTERNAL_PLATFORM_ERROR, BuildFailed
from openmicrovm.builder.outputs import SNAPSHOT_DIR, delete_build_outputs_async
from openmicrovm.builder.pipeline import BuildRequest, run_build
from openmicrovm.builder.unpack import UnpackLimits
from openmicrovm.hostnet import policies
from openmicrovm.lifecycle.version_outputs import VersionOutputs
from openmicrovm.logs.store import LogStore
from openmicrovm.objects import ObjectStoreError
from openmicrovm.runtime.driver import SandboxDriver
from openmicrovm.service import builds as build_records
from openmicrovm.service.core import Service
from openmicrovm.service.image_config import memory_mib
from openmicrovm.store.records import Build

log = logging.getLogger("openmicrovm.builds")


class BuildEngine:
    def __init__(
        self,
        service: Service,
        driver: SandboxDriver,
        logs: LogStore,
        host_id: str,
        outputs: VersionOutputs,
        on_slot_free: Callable[[], None] | None = None,
    ) -> None:
        self.service = service
        self.driver = driver
        self.logs = logs
        self.host_id = host_id
        self.outputs = outputs
        # Told when a build ends, so that the host agent can take the next waiting one.
        self.on_slot_free = on_slot_free or (lambda: None)
        self.builds_dir = service.settings.data_dir / "builds"
        self.work_dir = service.settings.data_dir / "work"
        self._slots = asyncio.Semaphore(max(service.settings.quotas.concurrent_builds, 1))
        # Parsed once, here, so that an invalid setting stops the server at start
        # (EgressSettingError) rather than failing every build.
        self.egress = policies.for_builds(service.settings)
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[str, asyncio.Task[None]] = {}

    # -- the seam -------------------------------------------------------------------------------
    def schedule_build(self, build_id: str) -> None:
        if build_id not in self._running:
            self._running[build_id] = self._spawn(self._build(build_id))

    # -- start-up and shut-down ----------------------------------------------------------------
    async def resume_pending_work(self, host_id: str) -> None:
        """Restart this host's interrupted builds (at start-up)."""
        builds = await self.service.persist(self.service.read, lambda tx: tx.builds.unfinished_ids(host_id))
        for build_id in builds:
            self.schedule_build(build_id)

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
            self.on_slot_free()

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
            egress=self.egress,
            buildah_driver=self.service.settings.buildah_driver,
            debian_mirror=self.service.settings.debian_mirror,
        )
        write(
            f"build {build_id} of {job.build.image_arn} version {job.version} ({job.build.architecture}) started"
        )
        try:
            result = await run_build(request, self.driver, write, lambda stage: write(f"stage: {stage}"))
        except BuildFailed as failure:
            return await self._failed(build_id, output, failure.state_reason, write)
        except asyncio.CancelledError:
            raise  # server shutting down: the build is restarted at the next start
        except Exception as error:
            log.exception("build %s crashed", build_id)
            reason = (
                f"{INTERNAL_PLATFORM_ERROR}: the build stopped on an internal error ({error}); try again."
            )
            return await self._failed(build_id, output, reason, write)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        record = result.to_record()
        try:
            record.update(await self.outputs.publish(output, lambda line: write(f"stage: {line}")))
        except ObjectStoreError as error:
            reason = (
                f"{INTERNAL_PLATFORM_ERROR}: the build's outputs could not be stored ({error}); try again."
            )
            return await self._failed(build_id, output, reason, write)
        write("build succeeded")
        # This host holds the outputs before the version says SUCCESSFUL, so that a run placed
        # the moment it does finds them.
        await self.service.persist(
            self.service.transact,
            lambda tx: tx.hosts.add_version(self.host_id, job.build.image_arn, job.build.version_number),
        )
        await self.service.persist(build_records.build_finished, self.service, build_id, True, None, record)

    async def _failed(self, build_id: str, output: Path, reason: str, write: Callable[[str], None]) -> None:
        write(f"build failed: {reason}")
        await self.service.persist(build_records.build_finished, self.service, build_id, False, reason, None)
        await delete_build_outputs_async(output)

    # -- deleting ------------------------------------------------------------------------------
    async def forget_builds(self, build_ids: list[str]) -> None:
        """These builds' version is deleted: stop them, free this host's outputs and logs."""
        for build_id in build_ids:
            if "/" in build_id or build_id.startswith("."):
                continue  # a wake-up names builds by id, never by path
            running = self._running.get(build_id)
            if running is not None:
                running.cancel()
            try:
                await delete_build_outputs_async(self.output_dir(build_id))
                self.logs.delete(f"builds/{build_id}")
            except OSError as error:  # one build's leftovers must not keep the others
                log.warning("freeing the outputs of build %s: %s", build_id, error)

    def versions_on_disk(self, builds: list[Build]) -> list[tuple[str, int]]:
        """(image ARN, version number) of the successful builds whose outputs are on this host."""
        return [
            (build.image_arn, build.version_number)
            for build in builds
            if (self.output_dir(build.build_id) / SNAPSHOT_DIR).is_dir()
        ]
