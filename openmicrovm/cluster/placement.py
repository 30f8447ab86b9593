"""Where a new MicroVM runs: a host with room that can get its version's snapshot.

Placement reads and writes in the RunMicrovm transaction. On PostgreSQL that transaction is
SERIALIZABLE, so two replicas placing at once cannot both count the same free memory: one of them
is replayed and sees the other's MicroVM (store.py retries it).
"""

from __future__ import annotations

from dataclasses import dataclass

from openmicrovm.store import Tx
from openmicrovm.store.records import Host

MIB = 1024 * 1024


class NoHost(Exception):
    """No host can take the MicroVM; the message says why, in words for the caller."""


@dataclass(frozen=True)
class Candidate:
    host: Host
    free_mib: int
    holds_version: bool


def admission_mib(snapshot_memory_bytes: int, memory_mib: int) -> int:
    """What a start is admitted for (MemoryGate's rule): the snapshot's memory, taken at once, and
    1/8 of the memory tier as room to grow."""
    return -(-snapshot_memory_bytes // MIB) + memory_mib // 8


def choose_host(
    tx: Tx,
    image_arn: str,
    version_number: int,
    architectures: set[str],
    need_mib: int,
    fetchable: bool,
    now: float,
) -> Host:
    """The host for a MicroVM of this version: among ACTIVE hosts of an architecture it was built
    for (`architectures`) that hold
    the version's outputs (or may fetch them from the snapshot store, when `fetchable`), one with
    room for `need_mib` (admission_mib) beyond what is already starting there; those holding the
    outputs first, then the one with the most room."""
    hosts = [host for host in tx.hosts.active(now) if host.architecture in architectures]
    if not hosts:
        wanted = " or ".join(sorted(architectures)) or "suitable"
        raise NoHost(f"no {wanted} host is active in the cluster")
    holding = tx.hosts.holding(image_arn, version_number)
    starting = tx.microvms.starting_mib_by_host()
    candidates = [
        Candidate(host, host.available_mib - starting.get(host.id, 0), host.id in holding)
        for host in hosts
        if fetchable or host.id in holding
    ]
    if not candidates:
        raise NoHost(
            "the image version's outputs are on no active host and no snapshot store is configured "
            "(snapshot_store_url)"
        )
    roomy = [c for c in candidates if c.free_mib >= need_mib]
    if not roomy:
        best = max(max(c.free_mib for c in candidates), 0)
        where = "the host" if len(candidates) == 1 else "any host"
        raise NoHost(
            f"not enough memory on {where} to run a MicroVM: it needs {need_mib} MiB to start "
            f"(snapshot footprint + 1/8 of its memory tier) and the roomiest host has {best} MiB free"
        )
    chosen = max(roomy, key=lambda c: (c.holds_version, c.free_mib, c.host.id))
    return chosen.host
