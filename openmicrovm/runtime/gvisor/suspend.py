"""Suspend in two tiers: frozen at once, memory to disk a while later.

suspend() freezes the sandbox (cgroup freezer; a resume is a thaw, a few ms) and schedules the disk
tier: after `suspend_to_disk_after` seconds, or at once when that is 0, its memory is checkpointed
into its state dir (SUSPEND_IMAGE) and runsc stops, freeing the RAM; resume() then restores it.

Every step is written to the record before it begins ("suspending" before a freeze or a
checkpoint, "suspended" after; "resuming" before a thaw or a restore, "running" after), and the
checkpoint and restore leave markers (CHECKPOINT_DONE, RESTORE_DONE), so that recovery.py can tell
after a crash which side of a transition a sandbox is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from typing import TYPE_CHECKING

from .. import agent_client, proc
from ..driver import DriverError, Sandbox, SnapshotError
from . import network
from .checkpoint import Marker, checkpoint

if TYPE_CHECKING:
    from .driver import GVisorDriver

log = logging.getLogger("openmicrovm.runtime")

SUSPEND_IMAGE = "suspended"  # directory inside a sandbox's state dir while it is suspended to disk
CHECKPOINT_DONE = "checkpoint.done"  # the suspend to disk succeeded
RESTORE_DONE = "restore.done"  # the resume from disk succeeded


def checkpoint_marker(sandbox: Sandbox) -> Marker:
    return Marker(sandbox.state_dir / CHECKPOINT_DONE)


def restore_marker(sandbox: Sandbox) -> Marker:
    return Marker(sandbox.state_dir / RESTORE_DONE)


def has_suspend_image(sandbox: Sandbox) -> bool:
    return (sandbox.state_dir / SUSPEND_IMAGE / "checkpoint.img").is_file()


class SuspendTiers:
    def __init__(self, driver: GVisorDriver) -> None:
        self.driver = driver
        self._disk_timers: dict[str, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[None]] = set()

    def mark(self, sandbox: Sandbox, state: str, suspended_in: str) -> None:
        """Persist which side of a transition the sandbox is on (see the module docstring)."""
        record = self.driver.record(sandbox)
        record.state, record.suspended_in = state, suspended_in
        self.driver.save(sandbox)

    async def suspend(self, sandbox: Sandbox) -> None:
        driver = self.driver
        async with driver.lock(sandbox.sandbox_id):
            driver.refresh(sandbox)
            record = driver.require_running(sandbox)
            cgroup = driver.cgroup_of(sandbox)
            record.footprint_bytes = cgroup.memory_bytes()
            if driver.suspend_to_disk_after > 0:
                self.mark(sandbox, "suspending", "memory")
                try:
                    # Connections go first, as they would at a checkpoint: one closing while the
                    # sandbox is frozen could still be half-open when the disk tier checkpoints it.
                    await agent_client.control(driver.agent_address(sandbox), "ABORT")
                    await cgroup.freeze()
                except BaseException:
                    with contextlib.suppress(DriverError):
                        cgroup.thaw()
                    self.mark(sandbox, "running", "")
                    raise
                self.mark(sandbox, "suspended", "memory")
                self.schedule_disk_tier(sandbox)
                return
            self.mark(sandbox, "suspending", "disk")
            try:
                await self._to_disk(sandbox)
            except BaseException:
                await driver.recovery.settle_suspend(sandbox, wait=False)
                raise
            self.mark(sandbox, "suspended", "disk")

    async def _to_disk(self, sandbox: Sandbox) -> None:
        """Checkpoint a running sandbox into its state dir and stop it, freeing its memory. The
        caller has marked the record "suspending" (disk)."""
        driver = self.driver
        image = sandbox.state_dir / SUSPEND_IMAGE
        marker = checkpoint_marker(sandbox)
        marker.clear()
        await asyncio.to_thread(shutil.rmtree, image, True)
        image.mkdir()
        result = await checkpoint(
            driver.commands,
            driver.binary_of(sandbox),
            driver.names_of(sandbox).container,
            driver.agent_address(sandbox),
            image,
            done=marker,
        )
        if result.returncode != 0:
            await asyncio.to_thread(shutil.rmtree, image, True)
            raise DriverError(f"cannot suspend sandbox {sandbox.sandbox_id}: {result.describe()}")
        await driver.stop_container(sandbox)

    def schedule_disk_tier(self, sandbox: Sandbox) -> None:
        self.cancel_disk_tier(sandbox.sandbox_id)
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._disk_timers.pop(sandbox.sandbox_id, None)
            task = loop.create_task(self._disk_tier(sandbox))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        self._disk_timers[sandbox.sandbox_id] = loop.call_later(self.driver.suspend_to_disk_after, fire)

    def cancel_disk_tier(self, sandbox_id: str) -> None:
        timer = self._disk_timers.pop(sandbox_id, None)
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        for sandbox_id in list(self._disk_timers):
            self.cancel_disk_tier(sandbox_id)

    async def _disk_tier(self, sandbox: Sandbox) -> None:
        """A frozen sandbox's memory goes to disk after a while."""
        driver = self.driver
        async with driver.lock(sandbox.sandbox_id):
            if not sandbox.state_dir.exists():
                return
            record = driver.refresh(sandbox)
            if record.state != "suspended" or record.suspended_in != "memory":
                return
            cgroup = driver.cgroup_of(sandbox)
            self.mark(sandbox, "suspending", "disk")
            cgroup.thaw()  # runsc checkpoints a running sandbox only
            try:
                await self._to_disk(sandbox)
            except Exception:
                log.exception(
                    "sandbox %s stays suspended in memory: writing it to disk failed", sandbox.sandbox_id
                )
                await driver.recovery.settle_suspend(sandbox, wait=False)
                if record.state == "running":  # the checkpoint left it running: freeze it again
                    with contextlib.suppress(DriverError):
                        await cgroup.freeze()
                        self.mark(sandbox, "suspended", "memory")
                return
            self.mark(sandbox, "suspended", "disk")

    async def resume(self, sandbox: Sandbox) -> None:
        driver = self.driver
        async with driver.lock(sandbox.sandbox_id):
            record = driver.refresh(sandbox)
            if record.state != "suspended":
                raise DriverError(f"sandbox {sandbox.sandbox_id} is not suspended")
            self.cancel_disk_tier(sandbox.sandbox_id)
            tier = record.suspended_in
            self.mark(sandbox, "resuming", tier)
            try:
                if tier == "memory":
                    driver.cgroup_of(sandbox).thaw()
                else:
                    await self.resume_from_disk(sandbox)
            except BaseException:
                self.mark(sandbox, "suspended", tier)  # a failed restore was stopped: try again later
                raise
            self.mark(sandbox, "running", "")
            await self.drop_suspend_image(sandbox)

    async def drop_suspend_image(self, sandbox: Sandbox) -> None:
        """Once the record says running: the suspend image and the markers have served."""
        await asyncio.to_thread(shutil.rmtree, sandbox.state_dir / SUSPEND_IMAGE, True)
        checkpoint_marker(sandbox).clear()
        restore_marker(sandbox).clear()

    async def resume_from_disk(self, sandbox: Sandbox) -> None:
        driver = self.driver
        record = driver.record(sandbox)
        image = sandbox.state_dir / SUSPEND_IMAGE
        if not has_suspend_image(sandbox):
            raise SnapshotError(f"the suspend image of sandbox {sandbox.sandbox_id} is missing")
        driver.gate.check("resume a sandbox", record.footprint_bytes, sandbox.spec.memory_mib)
        host = driver.names_of(sandbox)
        await network.ensure_address(host)
        bundle = sandbox.state_dir / "bundle"
        args = ["restore", "--detach", "--image-path", str(image), "--bundle", str(bundle), host.container]
        marker = restore_marker(sandbox)
        marker.clear()
        try:
            result = await driver.launch(sandbox, args, done=marker)
            if result.returncode != 0:
                raise DriverError(
                    f"cannot resume sandbox {sandbox.sandbox_id}: {proc.tail(driver.log_path(sandbox), 1500)}"
                )
            await driver.wait_ready(sandbox)
        except BaseException:
            # Stay suspended (the image is kept), so a later resume can try again.
            await driver.stop_container(sandbox)
            marker.clear()
            raise
        # The image and the markers stay until the record says running (resume(), recovery).
