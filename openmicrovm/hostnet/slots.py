"""Slots: the /30s that contained links (builds' veths, MicroVMs' uplinks) take, how their host
objects are named, and how a slot is leased. Builds and sandboxes share this one protocol.

A slot is leased by creating <dir>/XXXX.lease exclusively (XXXX: the slot in four hex digits)
with its holder's name inside, under one host-wide flock on <dir>/.lock that is held only while
leases are taken or swept, so that servers sharing a machine never collide. A lease outlives
its maker: a MicroVM's uplink lives as long as its sandbox does, across server restarts. Whether
a holder still lives is its owner's question, asked at a sweep: a build's holder is the server
process that runs it (its pid and start time, so a reused pid is not taken for it), an uplink's
the peer namespace it serves. A sweep removes the host objects of every slot whose lease is gone
or whose holder is, then the lease: the lease goes last, so nothing is ever left unaccounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

NETNS_DIR = Path("/run/netns")
_LOCK_FILE = ".lock"
_LOCK_POLL_SECONDS = 0.005
_LEASE = re.compile(r"^([0-9a-f]{4})\.lease$")


def tag(index: int) -> str:
    return f"{index:04x}"


@dataclass(frozen=True)
class SlotNames:
    """How the host objects of one kind of slot are named."""

    # The host end of the slot's veth: <link_prefix>XXXXh.
    link_prefix: str
    # Its nftables table (inet family): <table_prefix>XXXX.
    table_prefix: str
    # Its network namespace, for a kind of slot that has one of its own: <netns_prefix>XXXX.
    netns_prefix: str = ""

    def link(self, index: int) -> str:
        return f"{self.link_prefix}{tag(index)}h"

    def table(self, index: int) -> str:
        return f"{self.table_prefix}{tag(index)}"

    def netns(self, index: int) -> str:
        assert self.netns_prefix, "this kind of slot has no namespace of its own"
        return f"{self.netns_prefix}{tag(index)}"

    @property
    def link_pattern(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.link_prefix)}([0-9a-f]{{4}})h$")

    def present(self, tables: Iterable[str]) -> set[int]:
        """The slots some host object of this kind exists for (links, tables, namespaces)."""
        listings: list[tuple[re.Pattern[str], Iterable[str]]] = [
            (re.compile(rf"^{re.escape(self.table_prefix)}([0-9a-f]{{4}})$"), tables)
        ]
        with contextlib.suppress(OSError):
            listings.append((self.link_pattern, os.listdir("/sys/class/net")))
        if self.netns_prefix:
            with contextlib.suppress(OSError):
                pattern = re.compile(rf"^{re.escape(self.netns_prefix)}([0-9a-f]{{4}})$")
                listings.append((pattern, os.listdir(NETNS_DIR)))
        return {
            int(m.group(1), 16)
            for pattern, entries in listings
            for entry in entries
            if (m := pattern.match(entry))
        }


class LeaseTable:
    """The leases of one kind of slot: a directory of XXXX.lease files and its lock."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, index: int) -> Path:
        return self.directory / f"{tag(index)}.lease"

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """The host-wide lock around taking and sweeping leases. Polled without blocking, in the
        loop's thread, so that a cancelled caller can never leave the lock held by a stray thread."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_LOCK_POLL_SECONDS)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def take(self, holder: str, count: int) -> int | None:
        """Lease the lowest free of `count` slots to holder; None when all are leased. Call it
        under locked()."""
        for index in range(count):
            try:
                fd = os.open(self.path(index), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(holder + "\n")
            return index
        return None

    def holder(self, index: int) -> str | None:
        try:
            return self.path(index).read_text().strip() or None
        except OSError:
            return None

    def release(self, index: int) -> None:
        self.path(index).unlink(missing_ok=True)

    def leased(self) -> set[int]:
        try:
            entries = os.listdir(self.directory)
        except OSError:
            return set()
        return {int(m.group(1), 16) for entry in entries if (m := _LEASE.match(entry))}

    async def sweep(
        self, present: set[int], alive: Callable[[str], bool], remove: Callable[[int], Awaitable[None]]
    ) -> list[int]:
        """Under the lock: for every slot with host objects (present) or a lease, unless its
        holder is alive, remove(slot) its objects, then drop its lease. Returns the slots swept."""
        swept: list[int] = []
        async with self.locked():
            for index in sorted(present | self.leased()):
                holder = self.holder(index)
                if holder is not None and alive(holder):
                    continue
                await remove(index)
                self.release(index)
                swept.append(index)
        return swept


def _start_time(pid: int) -> str | None:
    """When process pid started (clock ticks since boot, /proc/<pid>/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ")".
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> str:
    """A holder naming this process, for leases that live as long as it does."""
    return f"pid {os.getpid()} {_start_time(os.getpid())}"


def process_alive(holder: str) -> bool:
    """Does the process a this_process() holder names still run? (Any other holder: no.)"""
    fields = holder.split()
    if len(fields) != 3 or fields[0] != "pid" or not fields[1].isdigit():
        return False
    return _start_time(int(fields[1])) == fields[2]
