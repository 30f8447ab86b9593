"""What a driver writes down: a sandbox's record, a snapshot's meta file, and how both are
written (atomically, readable by root only) and read back, from every release.

Layout under a driver's state root:
    sandboxes/<sandbox id>/record.json   what the sandbox is (spec, host key, agent secret, state)
    sandboxes/<sandbox id>/app.log       the app's stdout and stderr
    sandboxes/<sandbox id>/...           driver-specific (bundle, writable layer, suspend image)
A snapshot directory holds snapshot.json plus driver-specific files; it belongs to the caller and
is never removed by a driver. A driver with more to record subclasses SandboxRecord and
SnapshotMeta (gvisor/records.py).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Self, TypeVar

from openmicrovm.private_files import write_private_file

from .driver import DriverError, ProcessConfig, Sandbox, SandboxSpec, SnapshotError

SNAPSHOT_FORMAT = 1
RECORD_FILE = "record.json"
SNAPSHOT_FILE = "snapshot.json"


def spec_to_dict(spec: SandboxSpec) -> dict[str, Any]:
    data = asdict(spec)
    data["rootfs"] = str(spec.rootfs)
    return data


def spec_from_dict(data: dict[str, Any]) -> SandboxSpec:
    process = ProcessConfig(**data["process"])
    fields = {key: value for key, value in data.items() if key not in ("rootfs", "process")}
    return SandboxSpec(rootfs=Path(data["rootfs"]), process=process, **fields)


@dataclass
class SandboxRecord:
    sandbox_id: str
    driver: str
    spec: SandboxSpec
    key: str  # names the sandbox's host objects (names.host_names)
    token: str  # the agent's secret
    agent_binary: str
    # starting | running | suspended, and the transitions in between, written before they begin so
    # that adopt() after a crash knows which side of one a sandbox is on: suspending (a freeze or a
    # checkpoint to disk under way), resuming (a thaw or a restore from disk under way). gvisor
    # also has warm (a pool sandbox, gvisor/pool.py).
    state: str = "starting"
    # suspended: "memory" (frozen) or "disk" (checkpointed); suspending: the tier being entered;
    # resuming: the tier being left.
    suspended_in: str = ""
    footprint_bytes: int = 0  # memory in use when last snapshotted or suspended

    def to_json(self) -> str:
        data = asdict(self)
        data["spec"] = spec_to_dict(self.spec)
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Self:
        """The record a driver of this record type wrote. Keys of another record type are left
        out: records written before records were typed per driver carry every driver's fields."""
        data = json.loads(text)
        data["spec"] = spec_from_dict(data["spec"])
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True)
class SnapshotMeta:
    driver: str
    spec: SandboxSpec
    token: str
    footprint_bytes: int
    disk_bytes: int
    # A driver's own fields, in a subclass, are strings with "" as their default (what
    # read_snapshot_meta gives a snapshot made before the field existed).

    def to_json(self) -> str:
        data = asdict(self)
        data["spec"] = spec_to_dict(self.spec)
        data["format"] = SNAPSHOT_FORMAT
        return json.dumps(data, indent=1)


RecordT = TypeVar("RecordT", bound=SandboxRecord)
MetaT = TypeVar("MetaT", bound=SnapshotMeta)


def write_private(path: Path, text: str, durable: bool = True) -> None:
    """Atomic write readable by root only (records hold the agent secret): a crash leaves the old
    record or the new one, never a truncated one. `durable` (fsync, about 1 ms on an idle disk, far
    more while hundreds of sandboxes start or stop) for what must outlive the machine (snapshots);
    a sandbox's own files need only outlive the server (a machine crash ends the sandbox too)."""
    write_private_file(path, text.encode(), durable)


def _meta_json(snapshot_dir: Path) -> dict[str, Any]:
    """The snapshot's meta file as JSON; SnapshotError saying what is wrong with it."""
    try:
        data = json.loads((snapshot_dir / SNAPSHOT_FILE).read_text())
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {snapshot_dir} is incomplete: {SNAPSHOT_FILE} is missing") from None
    except (OSError, ValueError) as error:
        raise SnapshotError(
            f"snapshot {snapshot_dir} is corrupt: cannot read {SNAPSHOT_FILE}: {error}"
        ) from None
    if not isinstance(data, dict):
        raise SnapshotError(f"snapshot {snapshot_dir} is corrupt: {SNAPSHOT_FILE} is not an object")
    return data


def read_snapshot_meta(
    snapshot_dir: Path,
    driver: str,
    meta_type: type[MetaT] = SnapshotMeta,  # type: ignore[assignment]
) -> MetaT:
    if not snapshot_dir.is_dir():
        raise SnapshotError(f"snapshot {snapshot_dir} does not exist")
    data = _meta_json(snapshot_dir)
    if data.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(
            f"snapshot {snapshot_dir} has format {data.get('format')!r}, expected {SNAPSHOT_FORMAT}"
        )
    if data.get("driver") != driver:
        raise SnapshotError(
            f"snapshot {snapshot_dir} was made by the {data.get('driver')} driver and cannot be restored by {driver}"
        )
    try:
        common: dict[str, Any] = {
            "driver": data["driver"],
            "spec": spec_from_dict(data["spec"]),
            "token": str(data["token"]),
            "footprint_bytes": int(data["footprint_bytes"]),
            "disk_bytes": int(data["disk_bytes"]),
        }
        own = {
            item.name: str(data.get(item.name) or "") for item in fields(meta_type) if item.name not in common
        }
        meta = meta_type(**common, **own)
    except (KeyError, TypeError, ValueError) as error:
        raise SnapshotError(f"snapshot {snapshot_dir} is corrupt: {SNAPSHOT_FILE} lacks {error}") from None
    if not meta.spec.rootfs.is_dir():
        raise SnapshotError(
            f"snapshot {snapshot_dir} needs the image root filesystem {meta.spec.rootfs}, which is gone"
        )
    return meta


def relocate_snapshot(snapshot_dir: Path, rootfs: Path) -> None:
    """Point a snapshot copied from elsewhere (another host's outputs, fetched from the object
    store) at the image root filesystem `rootfs`: its meta file names the path the snapshot was
    made with. Only spec.rootfs changes; the rewrite is atomic (write_private)."""
    data = _meta_json(snapshot_dir)
    if not isinstance(data.get("spec"), dict):
        raise SnapshotError(f"snapshot {snapshot_dir} is corrupt: {SNAPSHOT_FILE} has no spec")
    data["spec"]["rootfs"] = str(rootfs)
    write_private(snapshot_dir / SNAPSHOT_FILE, json.dumps(data, indent=1))


def prepare_snapshot_dir(snapshot_dir: Path) -> None:
    if snapshot_dir.exists() and any(snapshot_dir.iterdir()):
        raise SnapshotError(f"snapshot directory {snapshot_dir} is not empty")
    snapshot_dir.mkdir(parents=True, exist_ok=True)


def discard_snapshot_contents(snapshot_dir: Path) -> None:
    """Undo a failed snapshot: the directory was empty before we wrote to it."""
    for entry in snapshot_dir.iterdir() if snapshot_dir.is_dir() else []:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def record_of(sandbox: Sandbox) -> SandboxRecord:
    """The record of a sandbox handle, any driver's (BaseDriver.record gives its own type)."""
    record = sandbox.extra.get("record")
    if not isinstance(record, SandboxRecord):
        raise DriverError(f"sandbox {sandbox.sandbox_id} handle has no record (not made by this driver)")
    return record
