"""What the gvisor driver keeps beyond every driver's record and snapshot meta: which runsc."""

from __future__ import annotations

from dataclasses import dataclass

from ..records import SandboxRecord, SnapshotMeta


@dataclass
class GVisorRecord(SandboxRecord):
    # The runsc binary the sandbox runs under and its platform; both empty in records written
    # before the driver could choose (those run under the runsc on PATH, on ptrace).
    runsc: str = ""
    runsc_platform: str = ""
    # The slot of the sandbox's egress uplink (runtime/egress.py), -1 without one.
    uplink: int = -1
    # "warm" is a state of gvisor records only: a pool sandbox, restored and frozen (pool.py).


@dataclass(frozen=True)
class GVisorSnapshotMeta(SnapshotMeta):
    # The version of the runsc that wrote the checkpoint (only that version restores it) and its
    # platform; both empty in snapshots made before the driver recorded them.
    runsc_version: str = ""
    runsc_platform: str = ""
