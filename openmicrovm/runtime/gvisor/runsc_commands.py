"""Every runsc command the driver runs: its flags, the binary it runs under, a timeout.

Which binaries exist is runtime/runsc.py's business; this module picks one per sandbox and per
snapshot (a checkpoint restores only under the runsc version that wrote it, so every sandbox and
snapshot keeps the runsc it was made with) and runs commands with it.

No runtime path asks runsc about a container's state (`runsc state`, `runsc list`): both hang on a
frozen sandbox (a warm one, one suspended in memory). Containers are found from runsc's state
files (containers()), and every runsc command has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import NamedTuple

from .. import names, proc, rootfs
from .. import runsc as runsc_binaries
from ..driver import DriverError, SnapshotError
from ..runsc import Runsc
from . import launcher
from .records import GVisorRecord, GVisorSnapshotMeta


class Binary(NamedTuple):
    """A runsc and the platform it runs a sandbox on."""

    runsc: Runsc
    platform: str


class RunscCommands:
    def __init__(self, runsc_root: Path, default: Binary, cache_dir: Path) -> None:
        """runsc_root: runsc's own state (--root); default: the binary for new sandboxes;
        cache_dir: where runsc_install.py keeps the newer runscs."""
        self.root = runsc_root
        self.default = default
        self.cache_dir = cache_dir
        self.root.mkdir(parents=True, exist_ok=True)

    def argv(self, binary: Binary, args: list[str]) -> list[str]:
        runsc, platform = binary
        return [
            runsc.path,
            "--root",
            str(self.root),
            f"--platform={platform}",
            "--network=sandbox",
            "--overlay2=root:memory",
            "--cpu-num-from-quota",
            # Otherwise runsc removes CAP_NET_RAW, which spec §5.8 grants; the only link a raw
            # socket could write to leads to the sandbox's own empty peer namespace.
            "--net-raw",
            # A checkpoint resets connections on eth0 instead of refusing (the agent has already
            # dropped them; this covers one still closing). Connections on the sandbox's own
            # loopback are saved and restored as they are.
            *(["--net-disconnect-ok"] if runsc.has_flag("net-disconnect-ok") else []),
            *args,
        ]

    async def run(
        self,
        args: list[str],
        *,
        binary: Binary | None = None,
        in_launcher: bool = False,
        root: dict[str, str] | None = None,
        log_file: Path | None = None,
        shim: list[str] | None = None,
        done: Path | None = None,
        timeout: float = 120.0,
    ) -> proc.Completed:
        """Run one runsc command. in_launcher: inside the launcher (launcher.py), which root (its
        environment, launcher.SandboxRoot.options) tells what to mount and done which marker to
        write when the command succeeds; shim: omv-shim's argv to run it under
        (agent_build.shim_prefix)."""
        argv = self.argv(binary or self.default, args)
        env = {"PATH": os.environ.get("PATH", rootfs.DEFAULT_PATH)}
        if done is not None:
            env["OMV_DONE"] = str(done)
        if in_launcher:
            argv = launcher.wrap(argv)
        if root is not None:
            env.update(root)
        if shim is not None:
            argv = [*shim, *argv]
        return await proc.run(argv, check=False, timeout=timeout, env=env, stdout_path=log_file)

    def containers(self) -> set[str]:
        """The ids of the containers runsc keeps state for under our root, read from its state
        files (runsc 2024: <id>_sandbox:<sandbox>.state; older runsc: a directory per container),
        never by asking runsc: `runsc list -format json` and `runsc state` hang on a frozen sandbox."""
        found: set[str] = set()
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root):
                if entry.name.endswith(".state"):
                    found.add(entry.name.removesuffix(".state").split("_sandbox:")[0])
                elif entry.is_dir() and names.key_of_container(entry.name) is not None:
                    found.add(entry.name)
        return found

    async def delete(self, container: str, binaries: list[Binary]) -> None:
        """`runsc delete -force`, with each binary in turn until runsc's record of it is gone."""
        result = None
        for binary in binaries:
            if container not in await asyncio.to_thread(self.containers):
                return
            result = await self.run(["delete", "-force", container], binary=binary, timeout=60)
        if container in await asyncio.to_thread(self.containers):
            words = result.describe() if result is not None else "no runsc to delete it with"
            raise DriverError(f"runsc could not delete container {container}: {words}")

    def is_launcher(self, pid: int) -> bool:
        """Is pid a launcher of ours (a checkpoint or restore a killed server left behind)?"""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.root).encode() in cmdline  # a zombie's is empty

    # ------------------------------------------------------------------ which binary

    def of_record(self, sandbox_id: str, record: GVisorRecord) -> Binary:
        """The runsc a sandbox runs under, and its platform."""
        if not record.runsc:  # made before the driver chose: the runsc on PATH, on ptrace
            legacy = runsc_binaries.system_binary()
            found = runsc_binaries.probe(legacy) if legacy else None
            if found is None:
                raise DriverError(f"sandbox {sandbox_id} runs under runsc from PATH, which is gone")
            return Binary(found, record.runsc_platform or "ptrace")
        found = runsc_binaries.probe(record.runsc)
        if found is None:
            raise DriverError(f"sandbox {sandbox_id} runs under {record.runsc}, which does not run any more")
        return Binary(found, record.runsc_platform or found.default_platform)

    def for_teardown(self, sandbox_id: str, record: GVisorRecord) -> Binary:
        """The sandbox's runsc, or the default one when that is gone (any runsc can delete a
        container whose processes the cgroup has already killed)."""
        try:
            return self.of_record(sandbox_id, record)
        except DriverError:
            return self.default

    def for_snapshot(self, snapshot_dir: Path, meta: GVisorSnapshotMeta) -> Binary:
        """A runsc of the version that wrote the snapshot's checkpoint."""
        if not meta.runsc_version:  # made before snapshots recorded it: by the runsc on PATH
            legacy = runsc_binaries.system_binary()
            found = runsc_binaries.probe(legacy) if legacy else None
            if found is None:
                raise SnapshotError(
                    f"snapshot {snapshot_dir} was made by the runsc on PATH, and there is none any more"
                )
            return Binary(found, meta.runsc_platform or "ptrace")
        found = runsc_binaries.with_version(meta.runsc_version, self.default.runsc, [self.cache_dir])
        if found is None:
            have = ", ".join(r.version for r in runsc_binaries.installed([self.cache_dir])) or "none"
            raise SnapshotError(
                f"snapshot {snapshot_dir} was made by runsc {meta.runsc_version}, which is not installed "
                f"here (installed: {have}); build the image version again"
            )
        platform = meta.runsc_platform or found.default_platform
        if platform not in found.platforms:
            platform = found.default_platform
        return Binary(found, platform)

    def every_binary(self) -> list[Binary]:
        """The default binary first, then every other runsc in the cache (for strays whose record
        is gone: one of them made the container)."""
        others = [r for r in runsc_binaries.installed([self.cache_dir]) if r.path != self.default.runsc.path]
        return [self.default, *(Binary(r, r.default_platform) for r in others)]
