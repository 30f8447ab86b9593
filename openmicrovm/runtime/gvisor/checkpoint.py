"""Checkpoints: `runsc checkpoint` into a directory, the snapshots made of one, and the markers
that tell a restarted server whether a checkpoint or a restore it did not see end succeeded.

Memory snapshots are `runsc checkpoint` / `runsc restore`: a restored sandbox continues every
process with its memory, open files and listening sockets, and any number of sandboxes can be
restored from one image.

runsc 2022 refuses to checkpoint while a TCP connection on eth0 is open, and cannot checkpoint an
app whose epoll instance watches a listening socket (asyncio, aiohttp, uvicorn: "encoding error at
object tcp.endpoint"). runsc 2024 checkpoints those apps, and with --net-disconnect-ok resets open
eth0 connections at a checkpoint instead of refusing (the retry loop in checkpoint() stays for 2022).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from .. import agent_client, proc
from ..agent_client import AgentAddress
from ..driver import SnapshotError
from ..records import read_snapshot_meta
from .records import GVisorSnapshotMeta
from .runsc_commands import Binary, RunscCommands

log = logging.getLogger("openmicrovm.runtime")

MEMORY_IMAGE = "memory"  # directory inside a snapshot holding runsc's checkpoint.img
SNAPSHOT_AGENT = "omv-agent"  # the agent binary the snapshot's processes were started from
CHECKPOINT_ATTEMPTS = 5
# How long a restarted server waits for a checkpoint or restore that a killed server left running.
HELPER_WAIT_SECONDS = 300.0


class Marker:
    """A file the launcher writes once a checkpoint or restore has succeeded, beside
    "<marker>.pid", which holds the launcher's pid while the command runs. The commands run in
    sessions of their own and so finish even when the server is killed under them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pid_file = path.with_name(path.name + ".pid")

    def is_set(self) -> bool:
        return self.path.is_file()

    def clear(self) -> None:
        for path in (self.path, self.pid_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def wait_for_command(self, is_launcher: Callable[[int], bool]) -> None:
        """Wait (bounded) for the command this marker belongs to, if it still runs."""
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HELPER_WAIT_SECONDS
        if is_launcher(pid):
            log.info("waiting for the %s a stopped server left running (pid %d)", self.path.stem, pid)
        while is_launcher(pid) and loop.time() < deadline:
            await asyncio.sleep(0.1)


# Checkpoint images are written uncompressed where runsc can (2023 and later; flate by default).
# Measured with bench_runtime (its app, runsc 20240729, ptrace): an idle sandbox restored from an
# uncompressed image holds 25 MiB in its cgroup instead of 58 MiB, a suspend to disk takes 114 ms
# instead of 206 ms, and a restore is as fast; the image takes more disk (10.8 MiB, not 2.9 MiB).
def uncompressed_image(binary: Binary) -> list[str]:
    return ["--compression=none"] if "compression" in binary.runsc.checkpoint_flags else []


async def checkpoint(
    commands: RunscCommands,
    binary: Binary,
    container: str,
    agent: AgentAddress,
    image_dir: Path,
    done: Marker | None = None,
) -> proc.Completed:
    """runsc checkpoint, which refuses while a TCP connection on eth0 is open: the agent drops
    them all first, and a connection that was just closing (one round trip in LAST_ACK) is
    waited out by trying again; a refused checkpoint leaves the sandbox running. done: the
    marker the launcher writes when the checkpoint succeeded."""
    for attempt in range(CHECKPOINT_ATTEMPTS):
        await agent_client.control(agent, "ABORT")
        result = await commands.run(
            [
                "checkpoint",
                *uncompressed_image(binary),
                "--image-path",
                str(image_dir),
                container,
            ],
            binary=binary,
            in_launcher=True,
            done=done.path if done is not None else None,
            timeout=600,
        )
        if (
            result.returncode == 0
            or "cannot be saved in connected state" not in result.stdout + result.stderr
        ):
            return result
        log.info("checkpoint of %s met a closing connection; trying again", container)
        await asyncio.sleep(0.02 * 2**attempt)
    return result


def read_snapshot(snapshot_dir: Path, driver: str) -> GVisorSnapshotMeta:
    """A complete snapshot's meta: its checkpoint image and agent are there too."""
    meta = read_snapshot_meta(snapshot_dir, driver, GVisorSnapshotMeta)
    image = snapshot_dir / MEMORY_IMAGE / "checkpoint.img"
    if not image.is_file() or image.stat().st_size == 0:
        raise SnapshotError(
            f"snapshot {snapshot_dir} is incomplete: {MEMORY_IMAGE}/checkpoint.img is missing"
        )
    if not (snapshot_dir / SNAPSHOT_AGENT).is_file():
        raise SnapshotError(f"snapshot {snapshot_dir} is incomplete: {SNAPSHOT_AGENT} is missing")
    return meta
