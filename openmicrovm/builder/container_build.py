"""Running the artifact's Dockerfile with `buildah bud` and explaining a failure.

Layers are cached (`--layers`), so a second version whose Dockerfile starts the same way reuses
every step up to the first change. Output streams to the build log line by line as buildah
prints it (`STEP 3/7: RUN ...`, then that step's own output).

The Dockerfile is the user's code, so the whole `buildah bud` runs in the build jail
(build_jail.py): a user namespace whose root is an unprivileged host id, a root filesystem of our
making with a minimal /dev, its own PID, mount, IPC and UTS namespaces, and a network namespace with
egress to the outside world only (build_network.py: nothing on the host, loopback included, is
reachable, so neither a RUN step nor `ADD http://127.0.0.1:...` reaches the control plane).
`RUN --mount` options that can name paths outside the build (dockerfile.unsafe_run_mount) are
refused before buildah sees them. RUN steps also lose CAP_SYS_CHROOT, without which the classic
escape from buildah's chroot (chroot into a subdir, `cd ..` past it, chroot again) is impossible;
they keep buildah's other default capabilities, its seccomp filter and its read-only /proc/sys
and /sys.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from openmicrovm.builder import build_jail
from openmicrovm.builder.build_network import open_build_network
from openmicrovm.builder.buildah import BuildahProcess, BuildahStore, LineSink, run_buildah
from openmicrovm.builder.cleanup import run_to_completion
from openmicrovm.builder.dockerfile import unsafe_run_mount
from openmicrovm.builder.errors import CONTAINER_BUILD_FAILED, INTERNAL_PLATFORM_ERROR, BuildFailed, disk_full
from openmicrovm.hostnet.addresses import EgressPolicy
from openmicrovm.hostnet.errors import HostNetworkError

# A registry that never answers must not hold a build for long (buildah's own timeouts are minutes).
DEFAULT_PULL_TIMEOUT_SECONDS = 30.0
# A RUN step that never ends (a server started by mistake, `sleep infinity`) must not hold one of the
# few build slots for ever; AWS's own builds take minutes.
DEFAULT_DOCKERFILE_TIMEOUT_SECONDS = 3600.0
_REASON_TAIL_LINES = 20
_REASON_LINE_CHARS = 400
# Where the build context and the image id file appear in the build jail.
_JAIL_CONTEXT = "/build/context"
_JAIL_OUT = "/build/out"

_TRYING_TO_PULL = re.compile(r"^Trying to pull (\S+?)\.\.\.$")
# What RUN steps may not do beyond buildah's defaults (which already exclude SYS_ADMIN, MKNOD,
# SYS_PTRACE, NET_RAW, ...): chroot(2) is the key to escaping chroot isolation.
DROPPED_CAPABILITIES = ("CAP_SYS_CHROOT",)
# Multi-stage builds prefix steps with the stage: "[2/2] STEP 1/15: FROM ...".
_STEP = re.compile(r"^(?:\[\d+/\d+\] )?STEP \d+/\d+: ")
_FROM_STEP = re.compile(r"^(?:\[\d+/\d+\] )?STEP \d+/\d+: FROM (\S+)")
# Lines that prove the registry answered, after which the pull is a download and may take long.
_PULL_PROGRESS = ("Getting image source signatures", "Copying blob", "Copying config", "Writing manifest")
_PULL_FAILURE_HINTS = (
    "creating build container",
    "initializing source",
    "pinging container registry",
    "reading manifest",
    "short-name",
    "manifest unknown",
    "unauthorized",
    "requested access to the resource is denied",
)


class _PullWatch:
    """Notices a `Trying to pull X...` that makes no progress, or a build that runs past its time
    limit, and stops the build."""

    def __init__(self, timeout: float, build_timeout: float = DEFAULT_DOCKERFILE_TIMEOUT_SECONDS) -> None:
        self.timeout = timeout
        self.build_timeout = build_timeout
        self.deadline = time.monotonic() + build_timeout
        self.overran = False
        self.pending: str | None = None
        self.since = 0.0
        self.stalled: str | None = None
        self.last_from: str | None = None
        self.last_pull: str | None = None

    def on_line(self, line: str) -> None:
        if match := _FROM_STEP.match(line):
            self.last_from = match.group(1)
        if match := _TRYING_TO_PULL.match(line):
            self.pending = self.last_pull = match.group(1)
            self.since = time.monotonic()
        elif line.startswith(_PULL_PROGRESS) or _STEP.match(line):
            self.pending = None

    async def watch(self, process: BuildahProcess) -> None:
        while process.returncode is None:
            await asyncio.sleep(0.5)
            if self.pending is not None and time.monotonic() - self.since > self.timeout:
                self.stalled = self.pending
                process.terminate()
                return
            if time.monotonic() > self.deadline:
                self.overran = True
                await process.stop()  # SIGTERM first; a RUN step that ignores it is killed
                return


def give_to_jail(directory: Path) -> None:
    """Hand the unpacked build context to the jail's root (host id ID_BASE): it is read there by an
    unprivileged id. Symlinks are changed themselves, never followed."""
    base = build_jail.ID_BASE
    for parent, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(parent, name), base, base)
    os.lchown(directory, base, base)


def _clip(line: str) -> str:
    return line if len(line) <= _REASON_LINE_CHARS else line[: _REASON_LINE_CHARS - 1] + "…"


def _container_build_failed(detail: str, tail: list[str]) -> BuildFailed:
    shown = "\n".join(_clip(line) for line in tail[-_REASON_TAIL_LINES:])
    prefix = f"{CONTAINER_BUILD_FAILED}: The container image build failed."
    return BuildFailed(CONTAINER_BUILD_FAILED, f"{prefix}{detail}\nLast lines of the build output:\n{shown}")


def _failure(tail: list[str], watch: _PullWatch) -> BuildFailed:
    if any("no space left on device" in line.lower() for line in tail):
        return disk_full("building the container image")
    error_lines = [line for line in tail if line.startswith("Error:")]
    error = error_lines[-1] if error_lines else ""
    detail = ""
    if watch.overran:
        detail = (
            f" It ran longer than the limit of {watch.build_timeout:g} seconds (the server's "
            "max_dockerfile_build_seconds) and was stopped: look for a RUN step that never ends."
        )
    elif watch.stalled is not None:
        detail = (
            f" Could not get the image {watch.stalled} named in FROM: no container registry answered within "
            f"{watch.timeout:g} seconds. Only registries reachable from this server can be used; "
            f"`FROM public.ecr.aws/lambda/microvms:al2023-minimal` needs none."
        )
    elif error and any(hint in error for hint in _PULL_FAILURE_HINTS):
        image = watch.last_pull or watch.last_from or "the FROM image"
        detail = f" Could not get the image {image} named in FROM ({error.removeprefix('Error: ')})."
    return _container_build_failed(detail, tail)


async def build_image(
    store: BuildahStore,
    context_dir: Path,
    iid_file: Path,
    log: LineSink,
    *,
    pull_timeout: float = DEFAULT_PULL_TIMEOUT_SECONDS,
    build_timeout: float = DEFAULT_DOCKERFILE_TIMEOUT_SECONDS,
    egress: EgressPolicy | None = None,
    cgroup_procs: Sequence[str] = (),
) -> str:
    """Build `context_dir/Dockerfile`; returns the image id. The image stays untagged: it is read
    once to make the version's root filesystem, and its layers stay behind as the build cache.
    egress: the build network's addresses and what it may reach (build_network.open_build_network).
    cgroup_procs: the cgroup (one cgroup.procs file per hierarchy) buildah and its RUN steps run in."""
    watch = _PullWatch(pull_timeout, build_timeout)

    def on_line(line: str) -> None:
        watch.on_line(line)
        log(line)

    problem = unsafe_run_mount(context_dir / "Dockerfile")
    if problem is not None:
        raise _container_build_failed(f" {problem}", [])
    # The jail's root is an unprivileged host id: it reads the context and writes the image id
    # only in dirs it owns.
    await asyncio.to_thread(give_to_jail, context_dir)
    out_dir = build_jail.prepare_owned_dir(iid_file.parent / "jail-out")
    jail_iid_file = f"{_JAIL_OUT}/{iid_file.name}"
    binds = [build_jail.Bind(str(context_dir), _JAIL_CONTEXT), build_jail.Bind(str(out_dir), _JAIL_OUT, True)]
    (out_dir / iid_file.name).unlink(missing_ok=True)
    iid_file.unlink(missing_ok=True)
    arguments = [
        *("bud", "--isolation", "chroot", "--layers", "--force-rm"),
        # Use a local image when there is one (the base image always is); pull otherwise.
        "--pull=false",
        # The docker format keeps SHELL, which the OCI format drops with a warning.
        *("--format", "docker"),
        *("--retry", "1", "--retry-delay", "1s"),
        *(f"--cap-drop={capability}" for capability in DROPPED_CAPABILITIES),
        *("--iidfile", jail_iid_file),
        *("--file", f"{_JAIL_CONTEXT}/Dockerfile"),
        _JAIL_CONTEXT,
    ]
    try:
        network = await open_build_network(egress)
    except HostNetworkError as error:
        raise BuildFailed.because(
            INTERNAL_PLATFORM_ERROR, f"The isolated build environment could not be set up: {error}"
        ) from None
    if not network.nameservers:
        log("openmicrovm: no DNS resolver of this server is reachable from builds; names will not resolve")
    try:
        result = await run_buildah(
            store,
            arguments,
            on_line=on_line,
            watchdog=lambda process: asyncio.ensure_future(watch.watch(process)),
            network=network,
            binds=binds,
            cgroup_procs=cgroup_procs,
        )
    finally:
        await run_to_completion(network.close())
    if result.returncode != 0 or watch.stalled is not None or watch.overran:
        raise _failure(result.tail, watch)
    written = out_dir / iid_file.name
    image_id = written.read_text().strip() if written.is_file() and not written.is_symlink() else ""
    iid_file.write_text(image_id)
    if not image_id:
        raise _container_build_failed(" buildah finished without naming the image it built.", result.tail)
    return image_id.removeprefix("sha256:")
