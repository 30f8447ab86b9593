"""A warm pool for restores: sandboxes restored ahead of time from hot snapshots, kept frozen.

Most of a gVisor restore (~0.3 s here) is runsc starting its processes and loading the image, none
of it the app's. So once a snapshot has been restored twice, the driver keeps `size` more sandboxes
restored from it in the background and frozen (cgroup freezer: RAM held, no CPU). The next
restore() of that snapshot takes one, gives it the caller's id and thaws it: the app continues
from the snapshot exactly as after a cold restore, a few milliseconds later instead of ~0.3 s.

Pool sandboxes are ordinary sandboxes named pool-<key>; a server that stops leaves them to the next
start's cleanup_strays. At most `max_snapshots` snapshots are kept warm (least recently used goes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import names
from ..driver import CapacityError, DriverError, Sandbox

log = logging.getLogger("openmicrovm.runtime")

HOT_AFTER = 2  # restores of a snapshot before it gets a pool
POOL_PREFIX = "pool-"

# (snapshot dir, mtime of its snapshot.json): a replaced snapshot is a different snapshot.
SnapshotKey = tuple[str, int]


def snapshot_key(snapshot_dir: Path) -> SnapshotKey | None:
    try:
        return (str(snapshot_dir.resolve()), (snapshot_dir / "snapshot.json").stat().st_mtime_ns)
    except OSError:
        return None


@dataclass
class _Warm:
    snapshot_dir: Path
    ready: list[str] = field(default_factory=list)  # pool sandbox ids, frozen
    restores: int = 0
    filling: asyncio.Task[None] | None = None


class RestorePool:
    def __init__(
        self,
        size: int,
        make: Callable[[str, Path], Awaitable[Sandbox]],
        hand_out: Callable[[str, str, bool], Awaitable[Sandbox | None]],
        discard: Callable[[str], Awaitable[None]],
        max_snapshots: int = 4,
    ) -> None:
        """make(pool_id, snapshot_dir) restores and freezes a pool sandbox; hand_out(pool_id,
        sandbox_id, egress) renames one, switches its egress on if asked and thaws it (None when
        it is no longer usable); discard(pool_id)
        destroys one."""
        self.size = size
        self.max_snapshots = max_snapshots
        self._make = make
        self._hand_out = hand_out
        self._discard = discard
        self._warm: OrderedDict[SnapshotKey, _Warm] = OrderedDict()

    async def take(self, snapshot_dir: Path, sandbox_id: str, egress: bool = False) -> Sandbox | None:
        key = snapshot_key(snapshot_dir)
        warm = self._warm.get(key) if key else None
        while warm is not None and warm.ready:
            pool_id = warm.ready.pop(0)
            try:
                sandbox = await self._hand_out(pool_id, sandbox_id, egress)
            except DriverError:
                log.exception("warm sandbox %s could not be handed out", pool_id)
                sandbox = None
            if sandbox is not None:
                return sandbox
            await self._discard_quietly(pool_id)
        return None

    def restored(self, snapshot_dir: Path) -> None:
        """Count a restore; a snapshot restored often enough gets (or refills) its pool."""
        if self.size <= 0:
            return
        key = snapshot_key(snapshot_dir)
        if key is None:
            return
        self._sweep()
        warm = self._warm.get(key)
        if warm is None:
            warm = self._warm[key] = _Warm(snapshot_dir)
        self._warm.move_to_end(key)
        warm.restores += 1
        if warm.restores >= HOT_AFTER and (warm.filling is None or warm.filling.done()):
            warm.filling = asyncio.get_running_loop().create_task(self._fill(key, warm))
        while len(self._warm) > self.max_snapshots:
            _, evicted = self._warm.popitem(last=False)
            self._evict(evicted)

    def _sweep(self) -> None:
        """Drop the warm sandboxes of snapshots that were deleted or replaced since."""
        for key, warm in list(self._warm.items()):
            if snapshot_key(warm.snapshot_dir) != key:
                del self._warm[key]
                self._evict(warm)

    async def _fill(self, key: SnapshotKey, warm: _Warm) -> None:
        while len(warm.ready) < self.size and self._warm.get(key) is warm:
            if snapshot_key(warm.snapshot_dir) != key:  # the snapshot was replaced or removed
                self._warm.pop(key, None)
                self._evict(warm)
                return
            pool_id = POOL_PREFIX + names.new_key()
            try:
                await self._make(pool_id, warm.snapshot_dir)
            except CapacityError as error:
                log.info("not keeping a warm sandbox for %s: %s", warm.snapshot_dir, error)
                return
            except DriverError:
                log.exception("restoring a warm sandbox from %s failed", warm.snapshot_dir)
                return
            if self._warm.get(key) is not warm:  # evicted while it was being made
                await self._discard_quietly(pool_id)
                return
            warm.ready.append(pool_id)

    def _evict(self, warm: _Warm) -> None:
        if warm.filling is not None and not warm.filling.done():
            warm.filling.cancel()
        ready, warm.ready = warm.ready, []
        if ready:
            asyncio.get_running_loop().create_task(self._discard_all(ready))

    async def _discard_all(self, pool_ids: list[str]) -> None:
        for pool_id in pool_ids:
            await self._discard_quietly(pool_id)

    async def _discard_quietly(self, pool_id: str) -> None:
        try:
            await self._discard(pool_id)
        except Exception:
            log.exception("removing warm sandbox %s failed", pool_id)

    async def close(self) -> None:
        """Stop filling and destroy every warm sandbox."""
        warm_sets = list(self._warm.values())
        self._warm.clear()
        for warm in warm_sets:
            task = warm.filling
            # A task of an event loop that has ended was cancelled with it and cleaned up after itself.
            if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await self._discard_all(warm.ready)
            warm.ready = []
