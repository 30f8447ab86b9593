"""One image build from artifact to snapshot (spec §4.4).

fetch → unpack → build (Dockerfile → image → root filesystem + config) → start the app in a
sandbox → ready hook (or the port opening) → snapshot → validate hook in a throw-away sandbox
restored from the snapshot. Each stage is announced through `stage(name)`; build output and hook
progress go to `log(line)`. Any failure raises BuildFailed with the `stateReason` text. Every
sandbox, buildah container and partial output is removed on every way out, cancellation included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openmicrovm.builder.architecture import check_architecture
from openmicrovm.builder.artifact import fetch_artifact
from openmicrovm.builder.base_image import ensure_base_image
from openmicrovm.builder.build_hooks import wait_for_hook, wait_for_port
from openmicrovm.builder.buildah import BuildahError, open_store
from openmicrovm.builder.cleanup import run_to_completion
from openmicrovm.builder.container_build import (
    DEFAULT_DOCKERFILE_TIMEOUT_SECONDS,
    DEFAULT_PULL_TIMEOUT_SECONDS,
    build_image,
)
from openmicrovm.builder.errors import (
    APPLICATION_START_FAILED,
    INTERNAL_PLATFORM_ERROR,
    BuildFailed,
    disk_full,
    is_disk_full,
)
from openmicrovm.builder.image_config import ImageConfig, read_image_config
from openmicrovm.builder.outputs import IMAGE_CONFIG_FILE, ROOTFS_DIR, SNAPSHOT_DIR
from openmicrovm.builder.rootfs_export import RootfsExport, export_rootfs
from openmicrovm.builder.unpack import UnpackLimits, unpack_artifact_async
from openmicrovm.config import default_cache_dir
from openmicrovm.hostnet.addresses import EgressPolicy
from openmicrovm.idmap import ID_BASE
from openmicrovm.runtime.driver import (
    DriverError,
    ProcessConfig,
    Sandbox,
    SandboxDriver,
    SandboxSpec,
    SnapshotInfo,
)

logger = logging.getLogger(__name__)

STAGES = ("fetch", "unpack", "build", "start", "ready", "snapshot", "validate")
DEFAULT_HOOK_TIMEOUT_SECONDS = 30  # spec §4.5: "default reported 30 s"
DEFAULT_APP_PORT = 8080
# A Dockerfile build's memory limit (its cgroup): the MicroVM's own memory, but never less than this,
# for package managers and compilers that need more while building than the app needs to run.
BUILD_MEMORY_FLOOR_MIB = 4096
_APP_LOG_CHUNK = 64 * 1024  # at most this much app output per relay into the build log

LogSink = Callable[[str], None]
StageSink = Callable[[str], None]


@dataclass(frozen=True)
class BuildRequest:
    build_id: str
    image_arn: str
    image_name: str
    image_version: str  # "1.0"
    region: str
    architecture: str  # API name: "X86_64" or "ARM_64"
    code_uri: str  # s3://bucket/key or file:///path.zip
    work_dir: Path  # scratch space of this build only; emptied afterwards
    output_dir: Path  # where the version's rootfs, snapshot and image config go
    environment: dict[str, str] = field(default_factory=dict)  # the image's environmentVariables
    # As the API gives it: {"port", "microvmImageHooks": {...}, "microvmHooks": {...}}, or None.
    hooks: dict[str, Any] | None = None
    memory_mib: int = 2048
    all_capabilities: bool = False
    cache_dir: Path = field(default_factory=default_cache_dir)
    s3_endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / real S3
    # As AWS: an artifact bucket in another region than the image fails the build. A single-region
    # S3-compatible store (MinIO reports us-east-1) serving images of several regions needs False.
    require_bucket_region: bool = True
    # Directories a file:// code_uri may be read from (Settings.effective_artifact_file_roots); none: refused.
    artifact_file_roots: tuple[Path, ...] = ()
    limits: UnpackLimits = field(default_factory=UnpackLimits)
    pull_timeout_seconds: float = DEFAULT_PULL_TIMEOUT_SECONDS
    dockerfile_timeout_seconds: float = DEFAULT_DOCKERFILE_TIMEOUT_SECONDS
    # Where the Dockerfile's RUN steps and fetches take their addresses and what they may reach
    # (hostnet/policies.for_builds; None: the settings' defaults). Private address space the policy
    # does not open is refused (hostnet/firewall.py).
    egress: EgressPolicy | None = None
    # buildah's storage driver (the setting buildah_driver; empty: the one that works here).
    buildah_driver: str = ""
    # Where the base root filesystem is bootstrapped from (the setting debian_mirror; empty: apt's).
    debian_mirror: str = ""
    # Without a ready hook: how long the app may take to accept connections.
    startup_timeout_seconds: float = DEFAULT_HOOK_TIMEOUT_SECONDS


@dataclass(frozen=True)
class BuildResult:
    rootfs_path: Path
    snapshot_path: Path
    image_config: ImageConfig
    memory_snapshot_bytes: int
    code_install_bytes: int  # size of the image root filesystem
    disk_snapshot_bytes: int
    artifact_bytes: int
    # Wall time per stage, in order; "build.base", "build.dockerfile" and "build.export" split "build".
    stage_seconds: dict[str, float]

    def to_record(self) -> dict[str, Any]:
        """JSON-ready form for the build's record; the size keys are the API's `snapshotBuild` members."""
        return {
            "memorySnapshotSizeInBytes": self.memory_snapshot_bytes,
            "codeInstallSizeInBytes": self.code_install_bytes,
            "diskSnapshotSizeInBytes": self.disk_snapshot_bytes,
            "snapshotDir": str(self.snapshot_path),
            "rootfsDir": str(self.rootfs_path),
            "imageConfig": self.image_config.to_dict(),
            "artifactBytes": self.artifact_bytes,
            "stageSeconds": dict(self.stage_seconds),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BuildResult:
        return cls(
            rootfs_path=Path(record["rootfsDir"]),
            snapshot_path=Path(record["snapshotDir"]),
            image_config=ImageConfig.from_dict(record["imageConfig"]),
            memory_snapshot_bytes=int(record["memorySnapshotSizeInBytes"]),
            code_install_bytes=int(record["codeInstallSizeInBytes"]),
            disk_snapshot_bytes=int(record["diskSnapshotSizeInBytes"]),
            artifact_bytes=int(record.get("artifactBytes", 0)),
            stage_seconds=dict(record.get("stageSeconds") or {}),
        )


@dataclass(frozen=True)
class _HookPlan:
    port: int | None
    ready: bool
    ready_timeout: float
    validate: bool
    validate_timeout: float

    @classmethod
    def from_api(cls, hooks: dict[str, Any] | None) -> _HookPlan:
        hooks = hooks or {}
        image_hooks = hooks.get("microvmImageHooks") or {}
        return cls(
            port=hooks.get("port"),
            ready=image_hooks.get("ready") == "ENABLED",
            ready_timeout=float(image_hooks.get("readyTimeoutInSeconds") or DEFAULT_HOOK_TIMEOUT_SECONDS),
            validate=image_hooks.get("validate") == "ENABLED",
            validate_timeout=float(
                image_hooks.get("validateTimeoutInSeconds") or DEFAULT_HOOK_TIMEOUT_SECONDS
            ),
        )


def app_environment(request: BuildRequest, config: ImageConfig) -> dict[str, str]:
    """Image ENV, then the image's environmentVariables, then what the service injects (spec §4.4)."""
    return {
        **config.env,
        **request.environment,
        "AWS_LAMBDA_MICROVM_IMAGE_ARN": request.image_arn,
        "AWS_LAMBDA_MICROVM_IMAGE_NAME": request.image_name,
        "AWS_LAMBDA_MICROVM_IMAGE_VERSION": request.image_version,
        "AWS_REGION": request.region,
    }


def sandbox_spec(request: BuildRequest, config: ImageConfig, rootfs: Path) -> SandboxSpec:
    if not config.argv:
        raise BuildFailed.because(
            APPLICATION_START_FAILED,
            "The image has neither ENTRYPOINT nor CMD, so there is no application to start. Add a CMD "
            'to the Dockerfile, e.g. CMD ["python3", "app.py"].',
        )
    process = ProcessConfig(
        argv=list(config.argv), env=app_environment(request, config), workdir=config.workdir, user=config.user
    )
    return SandboxSpec(
        rootfs=rootfs,
        process=process,
        memory_mib=request.memory_mib,
        all_capabilities=request.all_capabilities,
        # The build jail made the root filesystem: its files belong to the mapped ids.
        rootfs_id_base=ID_BASE,
    )


def _listening_port(plan: _HookPlan, config: ImageConfig) -> int:
    if plan.port:
        return int(plan.port)
    return config.tcp_ports[0] if config.tcp_ports else DEFAULT_APP_PORT


class _Build:
    """The state of one run_build call, so that cleanup knows what exists."""

    def __init__(self, request: BuildRequest, driver: SandboxDriver, log: LogSink, stage: StageSink) -> None:
        self.request = request
        self.driver = driver
        self.log = log
        self.announce = stage
        self.sandboxes: list[Sandbox] = []
        # Ids passed to start/restore: a call cancelled half-way returns no handle to destroy.
        self.sandbox_ids: list[str] = []
        self.rootfs_export: RootfsExport | None = None
        self.app_log_offsets: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.plan = _HookPlan.from_api(request.hooks)

    @contextmanager
    def stage(self, name: str, announce: bool = True) -> Iterator[None]:
        """Time a stage; parts of a stage ("build.export") are timed without being announced."""
        if announce:
            self.announce(name)
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - started, 3)

    async def run(self) -> BuildResult:
        request = self.request
        check_architecture(request.architecture)
        request.work_dir.mkdir(parents=True, exist_ok=True)
        request.output_dir.mkdir(parents=True, exist_ok=True)
        artifact = request.work_dir / "artifact.zip"
        context_dir = request.work_dir / "context"
        rootfs = request.output_dir / ROOTFS_DIR
        snapshot_dir = request.output_dir / SNAPSHOT_DIR

        with self.stage("fetch"):
            artifact_bytes = await fetch_artifact(
                request.code_uri,
                artifact,
                region=request.region,
                max_bytes=request.limits.max_total_bytes,
                endpoint_url=request.s3_endpoint_url,
                require_bucket_region=request.require_bucket_region,
                file_roots=request.artifact_file_roots,
                log=self.log,
            )
            self.log(f"fetched {request.code_uri} ({artifact_bytes} bytes)")
        with self.stage("unpack"):
            await asyncio.to_thread(shutil.rmtree, context_dir, True)
            unpacked = await unpack_artifact_async(artifact, context_dir, request.limits)
            self.log(f"unpacked {unpacked.files} files ({unpacked.total_bytes} bytes)")
        with self.stage("build"):
            config = await self._build_image(context_dir, rootfs)
        spec = sandbox_spec(request, config, rootfs)
        port = _listening_port(self.plan, config)

        with self.stage("start"):
            self.log(f"starting {json.dumps(config.argv)} as user {config.user} in {config.workdir}")
            sandbox = await self._start(spec)
        with self.stage("ready"):
            if self.plan.ready:
                await wait_for_hook(self.driver, sandbox, port, "ready", self.plan.ready_timeout, self.log)
            else:
                await wait_for_port(self.driver, sandbox, port, request.startup_timeout_seconds, self.log)
            self._relay_app_output(sandbox)
        with self.stage("snapshot"):
            await asyncio.to_thread(shutil.rmtree, snapshot_dir, True)
            info = await self.driver.snapshot(sandbox, snapshot_dir)
            self.log(
                f"snapshot written: {info.memory_bytes} bytes of memory, {info.disk_bytes} bytes of disk"
            )
        if self.plan.validate:
            with self.stage("validate"):
                await self._validate(snapshot_dir, port)
        return self._result(rootfs, snapshot_dir, config, info, artifact_bytes)

    async def _build_image(self, context_dir: Path, rootfs: Path) -> ImageConfig:
        request = self.request
        with self.stage("build.base", announce=False):
            store = await open_store(request.cache_dir, request.buildah_driver)
            await ensure_base_image(store, request.cache_dir, self.log, request.debian_mirror)
        with self.stage("build.dockerfile", announce=False):
            dockerfile_text = (context_dir / "Dockerfile").read_text(errors="replace")
            memory_mib = max(request.memory_mib, BUILD_MEMORY_FLOOR_MIB)
            cgroup = await self.driver.job_cgroup(f"build-{request.build_id}", memory_mib)
            try:
                image_id = await build_image(
                    store,
                    context_dir,
                    request.work_dir / "image-id",
                    self.log,
                    pull_timeout=request.pull_timeout_seconds,
                    build_timeout=request.dockerfile_timeout_seconds,
                    egress=request.egress,
                    cgroup_procs=[str(path) for path in cgroup.procs_files()] if cgroup else (),
                )
            finally:
                if cgroup is not None:  # whatever a RUN step left running dies with it
                    await run_to_completion(cgroup.remove())
            config = await read_image_config(store, image_id, dockerfile_text)
        with self.stage("build.export", announce=False):
            export = await export_rootfs(store, image_id, rootfs, f"openmicrovm-export-{request.build_id}")
        self.rootfs_export = export
        self.log(
            f"root filesystem ready: {export.files} files, {export.size_bytes} bytes "
            f"({export.linked_files} shared with the build cache, {export.copied_files} copied)"
        )
        (request.output_dir / IMAGE_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
        return config

    async def _start(self, spec: SandboxSpec) -> Sandbox:
        sandbox_id = f"build-{self.request.build_id}"
        self.sandbox_ids.append(sandbox_id)
        try:
            sandbox = await self.driver.start(sandbox_id, spec)
        except DriverError as error:
            raise BuildFailed.because(
                APPLICATION_START_FAILED, f"The application could not be started: {error}"
            ) from None
        self.sandboxes.append(sandbox)
        return sandbox

    async def _validate(self, snapshot_dir: Path, port: int) -> None:
        # A throw-away sandbox: only its answer counts, its state is discarded (spec §4.4 step 7).
        sandbox_id = f"validate-{self.request.build_id}"
        self.sandbox_ids.append(sandbox_id)
        sandbox = await self.driver.restore(sandbox_id, snapshot_dir)
        self.sandboxes.append(sandbox)
        try:
            await wait_for_hook(self.driver, sandbox, port, "validate", self.plan.validate_timeout, self.log)
        finally:
            await run_to_completion(self._destroy(sandbox))

    def _relay_app_output(self, sandbox: Sandbox) -> None:
        """Copy what the app printed since the last call into the build log (spec §4.4: build
        logs include the app's startup)."""
        offset = self.app_log_offsets.get(sandbox.sandbox_id, 0)
        try:
            with open(self.driver.log_path(sandbox), "rb") as output:
                output.seek(offset)
                data = output.read(_APP_LOG_CHUNK)
        except OSError:
            return
        self.app_log_offsets[sandbox.sandbox_id] = offset + len(data)
        for line in data.decode("utf-8", errors="replace").splitlines():
            self.log(f"app: {line}")

    async def _destroy(self, sandbox: Sandbox) -> None:
        self._relay_app_output(sandbox)
        try:
            await self.driver.destroy(sandbox)
        except Exception:  # cleanup must go on; the driver's strays sweep catches what is left
            logger.exception("destroying sandbox %s failed", sandbox.sandbox_id)
        if sandbox in self.sandboxes:
            self.sandboxes.remove(sandbox)

    async def cleanup(self, failed: bool) -> None:
        for sandbox in list(self.sandboxes):
            await self._destroy(sandbox)
        known = {sandbox.sandbox_id for sandbox in self.sandboxes}
        for sandbox_id in self.sandbox_ids:
            if sandbox_id in known:
                continue
            try:
                leftover = await self.driver.adopt(sandbox_id)
            except Exception:
                logger.exception("looking for sandbox %s after the build failed", sandbox_id)
                continue
            if leftover is not None:
                await self._destroy(leftover)
        await asyncio.to_thread(shutil.rmtree, self.request.work_dir, True)
        if failed:
            for name in (ROOTFS_DIR, SNAPSHOT_DIR, IMAGE_CONFIG_FILE, f"{ROOTFS_DIR}.partial"):
                path = self.request.output_dir / name
                if path.is_dir():
                    await asyncio.to_thread(shutil.rmtree, path, True)
                else:
                    path.unlink(missing_ok=True)

    def _result(
        self, rootfs: Path, snapshot_dir: Path, config: ImageConfig, info: SnapshotInfo, artifact_bytes: int
    ) -> BuildResult:
        return BuildResult(
            rootfs_path=rootfs,
            snapshot_path=snapshot_dir,
            image_config=config,
            memory_snapshot_bytes=info.memory_bytes,
            code_install_bytes=self.rootfs_export.size_bytes if self.rootfs_export else 0,
            disk_snapshot_bytes=info.disk_bytes,
            artifact_bytes=artifact_bytes,
            stage_seconds=dict(self.timings),
        )


def _as_build_failure(error: BaseException) -> BuildFailed:
    if is_disk_full(error) or "no space left on device" in str(error).lower():
        return disk_full("building the image")
    if isinstance(error, DriverError):
        return BuildFailed.because(INTERNAL_PLATFORM_ERROR, f"The sandbox runtime failed: {error}")
    if isinstance(error, BuildahError):
        return BuildFailed.because(INTERNAL_PLATFORM_ERROR, f"The image builder failed: {error}")
    return BuildFailed.because(
        INTERNAL_PLATFORM_ERROR, f"An unexpected error stopped the build ({type(error).__name__}: {error})."
    )


async def run_build(
    request: BuildRequest, driver: SandboxDriver, log: LogSink, stage: StageSink
) -> BuildResult:
    """Build one image version for one architecture. Raises BuildFailed (with `.state_reason`);
    asyncio.CancelledError propagates after everything the build created is removed."""
    build = _Build(request, driver, log, stage)
    failed = True
    try:
        result = await build.run()
        failed = False
        return result
    except (BuildFailed, asyncio.CancelledError):
        raise  # the caller records (and logs) the stateReason
    except Exception as error:
        logger.exception("build %s failed unexpectedly", request.build_id)
        raise _as_build_failure(error) from error
    finally:
        # A cancellation arriving while cleaning up must not leave sandboxes behind.
        await run_to_completion(build.cleanup(failed))
