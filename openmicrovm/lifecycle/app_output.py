"""Copies each MicroVM's app output (stdout and stderr, which the sandbox driver writes to a file)
into the MicroVM's log stream, line by line, as it appears.

The position reached is kept beside the stream, so after a restart copying goes on where it
stopped instead of starting over.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from openmicrovm.logs.store import LogStore

POLL_SECONDS = 0.25
MAX_READ = 1 << 20


class AppOutput:
    def __init__(self, logs: LogStore) -> None:
        self.logs = logs
        self._pumps: dict[str, asyncio.Task[None]] = {}

    def _offset_file(self, microvm_id: str) -> Path:
        return self.logs.root / "microvms" / f"{microvm_id}.app-offset"

    def follow(self, microvm_id: str, source: Path) -> None:
        if microvm_id not in self._pumps:
            self._pumps[microvm_id] = asyncio.get_running_loop().create_task(self._pump(microvm_id, source))

    async def stop(self, microvm_id: str) -> None:
        """Copy what is left, then stop following."""
        task = self._pumps.pop(microvm_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        for microvm_id in list(self._pumps):
            await self.stop(microvm_id)

    def _read_offset(self, microvm_id: str) -> int:
        try:
            return int(self._offset_file(microvm_id).read_text())
        except (OSError, ValueError):
            return 0

    def _copy(self, microvm_id: str, source: Path, final: bool) -> bool:
        """Copy whole new lines (and, when final, a last partial one); True if anything moved."""
        offset = self._read_offset(microvm_id)
        try:
            with open(source, "rb") as handle:
                handle.seek(offset)
                data = handle.read(MAX_READ)
        except OSError:
            return False
        end = len(data) if final else data.rfind(b"\n") + 1
        if end <= 0:
            return False
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            self.logs.append(f"microvms/{microvm_id}", f"app: {line}")
        path = self._offset_file(microvm_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(offset + end))
        return True

    async def _pump(self, microvm_id: str, source: Path) -> None:
        try:
            while True:
                while await asyncio.to_thread(self._copy, microvm_id, source, False):
                    pass
                await asyncio.sleep(POLL_SECONDS)
        finally:
            await asyncio.shield(asyncio.to_thread(self._copy, microvm_id, source, True))
