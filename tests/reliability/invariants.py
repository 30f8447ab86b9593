"""What must hold in a server's data dir and on the host, whatever happened to the server.

Read from the outside only: the database opened read-only (SQLite in the data dir, or the
PostgreSQL database its settings name), the data dir layout, and the
host's view of sandboxes (runsc containers, network namespaces, cgroups, mounts, processes). Two
levels:

- `record_violations`: every record in a legal state and consistent with its neighbours. Holds at
  any moment, even right after a SIGKILL.
- `settled_violations`: additionally, nothing in a transitional state, and host objects match the
  records one to one (no sandbox, netns, cgroup, container, mount, process, build output or work
  dir without a record; no record pointing at a missing snapshot or sandbox). Holds once the
  server has had time to recover and no build is running.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tests.support.host import processes_naming

IMAGE_STATES = {
    "CREATING",
    "CREATED",
    "CREATE_FAILED",
    "UPDATING",
    "UPDATED",
    "UPDATE_FAILED",
    "DELETING",
    "DELETE_FAILED",
}
VERSION_STATES = {"PENDING", "IN_PROGRESS", "SUCCESSFUL", "FAILED", "DELETING", "DELETE_FAILED"}
VERSION_STATUSES = {"ACTIVE", "INACTIVE"}
BUILD_STATES = {"PENDING", "IN_PROGRESS", "SUCCESSFUL", "FAILED"}
MICROVM_STATES = {"PENDING", "RUNNING", "SUSPENDING", "SUSPENDED", "RESUMING", "TERMINATING", "TERMINATED"}

TRANSITIONAL_MICROVM = {"PENDING", "SUSPENDING", "RESUMING", "TERMINATING"}
TRANSITIONAL_BUILD = {"PENDING", "IN_PROGRESS"}
TRANSITIONAL_VERSION = {"PENDING", "IN_PROGRESS", "DELETING"}
TRANSITIONAL_IMAGE = {"CREATING", "UPDATING", "DELETING"}
SETTLED_IMAGE = {"CREATED", "CREATE_FAILED", "UPDATED", "UPDATE_FAILED", "DELETE_FAILED"}
LIVE_MICROVM = MICROVM_STATES - {"TERMINATED"}
CGROUP_ROOT = Path("/sys/fs/cgroup")
# The controllers whose cgroups the drivers create and keep for a sandbox's whole life (cgroups.py);
# runsc adds the others while a container runs and removes them with it.
DRIVER_CONTROLLERS = {"memory", "cpu", "cpuacct", "pids", "freezer", "cgroup"}
NETNS_DIR = Path("/run/netns")
# Sandbox egress uplinks (openmicrovm/runtime/egress.py): a lease file per /30 naming the peer
# namespace it serves, a host veth omvs<slot>h and an nftables table inet omvs_<slot>.
UPLINK_LEASES = Path("/run/openmicrovm/sandbox-net")
UPLINK_LINK = re.compile(r"^omvs([0-9a-f]{4})h$")
UPLINK_TABLE = re.compile(r"^table inet omvs_([0-9a-f]{4})$")


@dataclass(frozen=True)
class Snapshot:
    """The database rows of one data dir, read in one read-only transaction."""

    images: list[dict[str, Any]]
    versions: list[dict[str, Any]]
    builds: list[dict[str, Any]]
    microvms: list[dict[str, Any]]

    def microvm(self, microvm_id: str) -> dict[str, Any] | None:
        return next((row for row in self.microvms if row["id"] == microvm_id), None)

    def image(self, arn: str) -> dict[str, Any] | None:
        return next((row for row in self.images if row["arn"] == arn), None)

    def versions_of(self, arn: str) -> list[dict[str, Any]]:
        return [row for row in self.versions if row["image_arn"] == arn]

    def transitional(self) -> list[str]:
        """What is still moving: '<kind> <id> <state>' for each record in a transitional state."""
        moving = [
            f"microvm {r['id']} {r['state']}" for r in self.microvms if r["state"] in TRANSITIONAL_MICROVM
        ]
        moving += [
            f"build {r['build_id']} {r['state']}" for r in self.builds if r["state"] in TRANSITIONAL_BUILD
        ]
        moving += [
            f"version {r['image_arn']} {r['number']}.0 {r['state']}"
            for r in self.versions
            if r["state"] in TRANSITIONAL_VERSION
        ]
        moving += [f"image {r['arn']} {r['state']}" for r in self.images if r["state"] in TRANSITIONAL_IMAGE]
        return moving


_TABLES = ("images", "versions", "builds", "microvms")


def database_url(data_dir: Path) -> str | None:
    """The PostgreSQL URL the data dir's settings name, or None for SQLite in the data dir."""
    settings = data_dir / "settings.toml"
    if not settings.exists():
        return None
    return tomllib.loads(settings.read_text()).get("database_url") or None


def read_snapshot(data_dir: Path) -> Snapshot:
    """All rows, read-only, in one transaction. Works while the server runs and after it was
    killed (SQLite's WAL is read)."""
    url = database_url(data_dir)
    if url is not None:
        with psycopg.connect(url, row_factory=dict_row, autocommit=True) as pg:
            with pg.transaction():
                pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                tables = {name: pg.execute(f"SELECT * FROM {name}").fetchall() for name in _TABLES}
        return Snapshot(**tables)
    connection = sqlite3.connect(f"file:{data_dir / 'openmicrovm.db'}?mode=ro", uri=True, timeout=10)
    connection.row_factory = sqlite3.Row
    try:
        with connection:
            connection.execute("BEGIN")
            tables = {
                name: [dict(row) for row in connection.execute(f"SELECT * FROM {name}")] for name in _TABLES
            }
    finally:
        connection.close()
    return Snapshot(**tables)


def record_violations(snapshot: Snapshot) -> list[str]:
    """Legal states and consistent neighbours, true at any moment."""
    problems: list[str] = []
    images = {row["arn"]: row for row in snapshot.images}
    versions: dict[tuple[str, int], dict[str, Any]] = {
        (r["image_arn"], r["number"]): r for r in snapshot.versions
    }
    builds_of: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for build in snapshot.builds:
        builds_of.setdefault((build["image_arn"], build["version_number"]), []).append(build)
        if build["state"] not in BUILD_STATES:
            problems.append(f"build {build['build_id']} in illegal state {build['state']!r}")
        if (build["image_arn"], build["version_number"]) not in versions:
            problems.append(f"build {build['build_id']} belongs to no version")
        if build["state"] == "SUCCESSFUL" and not build["artifacts"]:
            problems.append(f"SUCCESSFUL build {build['build_id']} has no artifacts")
        if build["state"] == "FAILED" and not build["state_reason"]:
            problems.append(f"FAILED build {build['build_id']} has no stateReason")
    for image in snapshot.images:
        if image["state"] not in IMAGE_STATES:
            problems.append(f"image {image['arn']} in illegal state {image['state']!r}")
        own = [r for key, r in versions.items() if key[0] == image["arn"]]
        if not own:
            problems.append(f"image {image['arn']} ({image['state']}) has no version")
        states = {r["state"] for r in own}
        if image["state"] == "DELETING" and states - {"DELETING"}:
            problems.append(f"DELETING image {image['arn']} has versions in {sorted(states)}")
        if image["state"] in SETTLED_IMAGE and states & TRANSITIONAL_VERSION:
            problems.append(f"{image['state']} image {image['arn']} has versions in {sorted(states)}")
        if image["state"] == "CREATING" and not states & {"PENDING", "IN_PROGRESS"}:
            problems.append(f"CREATING image {image['arn']} has no version being built: {sorted(states)}")
        if image["state"] == "UPDATING" and not states & TRANSITIONAL_VERSION:
            problems.append(f"UPDATING image {image['arn']} has nothing in progress: {sorted(states)}")
        if image["state"] != "DELETING" and own and all(r["state"] == "DELETING" for r in own):
            problems.append(f"{image['state']} image {image['arn']} has only DELETING versions")
        if image["next_version"] <= max((r["number"] for r in own), default=0):
            problems.append(f"image {image['arn']} would reuse a version number")
    for key, version in versions.items():
        label = f"version {key[0]} {key[1]}.0"
        if key[0] not in images:
            problems.append(f"{label} belongs to no image")
        if version["state"] not in VERSION_STATES:
            problems.append(f"{label} in illegal state {version['state']!r}")
        if version["status"] not in VERSION_STATUSES:
            problems.append(f"{label} has illegal status {version['status']!r}")
        if version["status"] == "ACTIVE" and version["state"] not in ("SUCCESSFUL", "DELETING"):
            problems.append(f"{label} is ACTIVE but {version['state']}")
        build_states = {b["state"] for b in builds_of.get(key, [])}
        if not build_states and version["state"] != "DELETING":
            problems.append(f"{label} ({version['state']}) has no build")
        if version["state"] == "SUCCESSFUL" and build_states != {"SUCCESSFUL"}:
            problems.append(f"SUCCESSFUL {label} has builds in {sorted(build_states)}")
        if version["state"] == "FAILED" and (
            "FAILED" not in build_states or build_states & TRANSITIONAL_BUILD
        ):
            problems.append(f"FAILED {label} has builds in {sorted(build_states)}")
        if version["state"] in ("PENDING", "IN_PROGRESS") and not build_states & TRANSITIONAL_BUILD:
            problems.append(f"{version['state']} {label} has no build in progress: {sorted(build_states)}")
    endpoints: set[str] = set()
    for vm in snapshot.microvms:
        label = f"microvm {vm['id']} ({vm['state']})"
        if vm["state"] not in MICROVM_STATES:
            problems.append(f"{label} is in an illegal state")
        if vm["endpoint"] in endpoints:
            problems.append(f"{label} shares its endpoint")
        endpoints.add(vm["endpoint"])
        if vm["state"] == "TERMINATED":
            if vm["terminated_at"] is None or not vm["state_reason"]:
                problems.append(f"{label} lacks terminatedAt or stateReason")
            elif "internal error" in vm["state_reason"]:
                problems.append(f"internal-error: {label} ended on {vm['state_reason'][:200]}")
        else:
            if vm["terminated_at"] is not None:
                problems.append(f"{label} has a terminatedAt")
            number = int(str(vm["image_version"]).split(".")[0])
            if (vm["image_arn"], number) not in versions:
                problems.append(
                    f"{label} runs version {vm['image_version']} of {vm['image_arn']}, which is gone"
                )
        if vm["state"] == "SUSPENDED" and vm["suspended_at"] is None:
            problems.append(f"{label} has no suspendedAt")
        if vm["state"] == "RUNNING" and vm["suspended_at"] is not None:
            problems.append(f"{label} still has a suspendedAt")
    return problems


# ---------------------------------------------------------------------------------------------- host


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def sandbox_key(sandbox_id: str) -> str:
    """The 12 hex digits naming a sandbox's host objects (openmicrovm/runtime/names.py)."""
    return _digest(sandbox_id, 12)


@dataclass(frozen=True)
class HostView:
    """A data dir's footprint on the host, as the sandbox drivers name it (runtime/names.py)."""

    data_dir: Path
    server_pids: frozenset[int] = frozenset()

    @property
    def state_root(self) -> Path:
        return self.data_dir / "sandboxes"

    def scopes(self) -> dict[str, str]:
        root = self.state_root.resolve()
        return {driver: _digest(f"{root}|{driver}", 8) for driver in ("gvisor", "process")}

    def sandbox_dirs(self) -> set[str]:
        path = self.state_root / "sandboxes"
        return {entry.name for entry in path.iterdir()} if path.is_dir() else set()

    def cgroup_keys(self) -> dict[str, set[str]]:
        """Per cgroup hierarchy, the sandbox keys below this data dir's parents."""
        found: dict[str, set[str]] = {}
        parents = {f"openmicrovm-{scope}" for scope in self.scopes().values()}
        hierarchies = [CGROUP_ROOT] if (CGROUP_ROOT / "cgroup.controllers").exists() else []
        if not hierarchies and CGROUP_ROOT.is_dir():
            hierarchies = [path for path in CGROUP_ROOT.iterdir() if path.is_dir()]
        for hierarchy in hierarchies:
            for parent in parents:
                directory = hierarchy / parent
                with contextlib.suppress(OSError):
                    keys = {entry.name for entry in directory.iterdir() if entry.is_dir()}
                    found[hierarchy.name] = found.get(hierarchy.name, set()) | keys
        return found

    def netns_names(self) -> set[str]:
        prefixes = tuple(f"omv-{scope}-" for scope in self.scopes().values())
        try:
            return {name for name in (p.name for p in NETNS_DIR.iterdir()) if name.startswith(prefixes)}
        except FileNotFoundError:
            return set()

    def uplink_leases(self) -> dict[str, str]:
        """slot -> the peer namespace its lease names, for this data dir's sandboxes."""
        prefixes = tuple(f"omv-{scope}-" for scope in self.scopes().values())
        found: dict[str, str] = {}
        for lease in UPLINK_LEASES.glob("*.lease") if UPLINK_LEASES.is_dir() else []:
            with contextlib.suppress(OSError):
                holder = lease.read_text().strip()
                if holder.startswith(prefixes):
                    found[lease.name.removesuffix(".lease")] = holder
        return found

    def unleased_uplink_objects(self) -> list[str]:
        """Uplink veths and tables of any server with no lease: removal drops the lease last and
        creation takes it first, so these are always left behind."""
        leased = (
            {p.name.removesuffix(".lease") for p in UPLINK_LEASES.glob("*.lease")}
            if UPLINK_LEASES.is_dir()
            else set()
        )
        found = []
        for link in sorted(p.name for p in Path("/sys/class/net").iterdir()):
            if (match := UPLINK_LINK.match(link)) and match.group(1) not in leased:
                found.append(f"link {link}")
        listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        for line in listed.splitlines():
            if (match := UPLINK_TABLE.match(line.strip())) and match.group(1) not in leased:
                found.append(f"nftables {line.strip()}")
        return found

    def runsc_containers(self) -> set[str]:
        """Container ids in runsc's own state below this data dir, read from its state files
        (`<id>_sandbox:<sandbox>.state`, or a directory per container in older runsc), so that any
        runsc version's containers are seen and no frozen sandbox is asked anything."""
        root = self.state_root / "runsc"
        found: set[str] = set()
        for entry in root.iterdir() if root.is_dir() else []:
            if entry.name.endswith(".state"):
                found.add(entry.name.removesuffix(".state").split("_sandbox:")[0])
            elif entry.is_dir() and entry.name.startswith("omv-"):
                found.add(entry.name)
        return found

    def mounts(self) -> list[str]:
        marker = str(self.data_dir.resolve())
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        return [line.split()[4] for line in lines if marker in line.split()[4]]

    def cgroup_key_of(self, pid: int) -> str | None:
        """The sandbox key of the cgroup a process is in, when it is one of this data dir's."""
        parents = {f"openmicrovm-{scope}" for scope in self.scopes().values()}
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            parts = line.split(":", 2)[-1].strip("/").split("/")
            if len(parts) >= 2 and parts[0] in parents:
                return parts[1]
        return None

    def processes(self) -> dict[int, str]:
        """pid -> command line of every process whose command line names this data dir."""
        found = processes_naming(str(self.data_dir.resolve()))
        return {pid: cmdline for pid, cmdline in found.items() if pid not in self.server_pids}


def sweep_cgroups(data_dir: Path) -> list[str]:
    """Remove the empty cgroups a stopped server of this data dir left in any hierarchy (the
    drivers leave runsc's own after a crash, see test_crash_safety.py), so tests leave none."""
    view = HostView(data_dir)
    removed: list[str] = []
    parents = {f"openmicrovm-{scope}" for scope in view.scopes().values()}
    for hierarchy in (p for p in CGROUP_ROOT.iterdir() if p.is_dir()) if CGROUP_ROOT.is_dir() else []:
        for parent in (hierarchy / name for name in parents):
            for child in (c for c in parent.iterdir() if c.is_dir()) if parent.is_dir() else []:
                with contextlib.suppress(OSError):
                    child.rmdir()
                    removed.append(str(child))
            with contextlib.suppress(OSError):
                parent.rmdir()
    return removed


def _sandbox_record(view: HostView, sandbox_id: str) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((view.state_root / "sandboxes" / sandbox_id / "record.json").read_text())
        return record if isinstance(record, dict) else None
    return None


def host_key(data_dir: Path, sandbox_id: str) -> str:
    """The key a sandbox's host objects are named by: its record's, or the hash of its id."""
    record = _sandbox_record(HostView(data_dir), sandbox_id) or {}
    return str(record.get("key") or sandbox_key(sandbox_id))


POOL_PREFIX = (
    "pool-"  # sandboxes a driver restores ahead of time (runtime/gvisor/pool.py), owned by no record
)


class _Sandboxes:
    """The sandbox state dirs of a data dir and the host key of each: the key its record names
    (drivers that pick a random key per sandbox), else the hash of its id (drivers that derive it).
    Also who each host object belonged to, for messages."""

    def __init__(self, view: HostView, snapshot: Snapshot) -> None:
        self.records: dict[str, dict[str, Any] | None] = {
            d: _sandbox_record(view, d) for d in view.sandbox_dirs()
        }
        self.key_of: dict[str, str] = {
            sandbox_id: str((record or {}).get("key") or sandbox_key(sandbox_id))
            for sandbox_id, record in self.records.items()
        }
        owners: dict[str, str] = {}
        for vm in snapshot.microvms:
            owners[vm["id"]] = f"{vm['id']} {vm['state']}: {vm['state_reason']}"
        for build in snapshot.builds:
            for prefix in ("build-", "validate-"):
                owners[prefix + build["build_id"]] = f"{prefix}{build['build_id']} {build['state']}"
        self.owner_of_id = owners
        self.owner_of_key = {sandbox_key(sandbox_id): words for sandbox_id, words in owners.items()}
        self.owner_of_key.update(
            {key: owners.get(sandbox_id, f"sandbox {sandbox_id}") for sandbox_id, key in self.key_of.items()}
        )

    def of(self, key: str) -> str:
        return f" [{self.owner_of_key.get(key, 'no sandbox record')}]"

    def of_id(self, sandbox_id: str) -> str:
        return f" [{self.owner_of_id.get(sandbox_id, 'no MicroVM or build record')}]"

    def of_command(self, cmdline: str) -> str:
        for key, words in self.owner_of_key.items():
            if key in cmdline:
                return f" [{words}]"
        for sandbox_id, words in self.owner_of_id.items():
            if sandbox_id in cmdline:
                return f" [{words}]"
        return ""


def _suspended_on_disk(record: dict[str, Any]) -> bool:
    """Drivers with a suspend tier keep a suspended sandbox frozen in memory for a while first."""
    return record.get("suspended_in", "disk") in ("disk", "")


def settled_violations(data_dir: Path, server_pids: frozenset[int] = frozenset()) -> list[str]:
    """Everything of record_violations, plus: nothing transitional, and the host holds exactly
    what the records say (see the module docstring). Each stray names the record it belonged to."""
    snapshot = read_snapshot(data_dir)
    problems = record_violations(snapshot)
    problems += [f"still transitional: {item}" for item in snapshot.transitional()]
    view = HostView(data_dir, server_pids)
    sandboxes = _Sandboxes(view, snapshot)
    live = {vm["id"]: vm["state"] for vm in snapshot.microvms if vm["state"] in LIVE_MICROVM}
    pool = {d for d in sandboxes.records if d.startswith(POOL_PREFIX)}

    for stray in sorted(set(sandboxes.records) - set(live) - pool):
        problems.append(f"stray sandbox dir {stray}{sandboxes.of_id(stray)}")
    expected: dict[str, str] = {sandboxes.key_of[sandbox_id]: sandbox_id for sandbox_id in pool}
    for vm, state in live.items():
        record = sandboxes.records.get(vm)
        if record is None:
            problems.append(f"{state} microvm {vm} has no sandbox")
            continue
        expected[sandboxes.key_of[vm]] = vm
        wanted = "suspended" if state in ("SUSPENDED", "SUSPENDING") else "running"
        if record.get("state") != wanted:
            problems.append(f"{state} microvm {vm}: its sandbox record says {record.get('state')!r}")
        if state == "SUSPENDED" and record.get("driver") == "gvisor" and _suspended_on_disk(record):
            if not (view.state_root / "sandboxes" / vm / "suspended" / "checkpoint.img").is_file():
                problems.append(f"SUSPENDED microvm {vm} has no suspend image")

    strays: dict[str, list[str]] = {}
    for hierarchy, found in sorted(view.cgroup_keys().items()):
        for stray in sorted(found - set(expected)):
            strays.setdefault(stray, []).append(hierarchy)
        for key, sandbox_id in expected.items():
            if key not in found and hierarchy in DRIVER_CONTROLLERS:
                problems.append(f"sandbox {sandbox_id} has no cgroup in {hierarchy}")
    for stray, hierarchies in sorted(strays.items()):
        problems.append(f"stray cgroup {stray} ({', '.join(hierarchies)}){sandboxes.of(stray)}")
    namespaces = view.netns_names()
    for name in sorted(namespaces):
        key = name.split("-")[2]
        if key not in expected:
            problems.append(f"stray network namespace {name}{sandboxes.of(key)}")
    for key, sandbox_id in expected.items():
        if not any(name.split("-")[2] == key for name in namespaces):
            problems.append(f"sandbox {sandbox_id} has no network namespace")

    for slot, holder in sorted(view.uplink_leases().items()):
        key = holder.split("-")[2]
        if key not in expected or holder not in namespaces:
            problems.append(f"stray uplink lease {slot} of {holder}{sandboxes.of(key)}")
    problems += [f"stray uplink {item}" for item in view.unleased_uplink_objects()]

    containers = view.runsc_containers()
    for container in sorted(containers):
        key = container.removeprefix("omv-")
        sandbox_id = expected.get(key)
        record = sandboxes.records.get(sandbox_id or "") or {}
        if sandbox_id is None:
            problems.append(f"stray runsc container {container}{sandboxes.of(key)}")
        elif live.get(sandbox_id) == "SUSPENDED" and _suspended_on_disk(record):
            problems.append(f"stray runsc container {container} of SUSPENDED microvm {sandbox_id}")
    for vm, state in live.items():
        record = sandboxes.records.get(vm) or {}
        if state == "RUNNING" and record.get("driver") == "gvisor":
            if f"omv-{sandboxes.key_of.get(vm, '')}" not in containers:
                problems.append(f"RUNNING microvm {vm} has no runsc container")

    for point in view.mounts():
        problems.append(f"stray host mount {point}")
    names = set(expected.values()) | set(expected)  # sandbox ids, and keys (omv-<key>, pool-<key>)
    for pid, cmdline in sorted(view.processes().items()):
        if view.cgroup_key_of(pid) not in expected and not any(name in cmdline for name in names):
            problems.append(f"stray process {pid}: {cmdline[:160]}{sandboxes.of_command(cmdline)}")

    problems += _build_output_violations(data_dir, snapshot)
    return problems


def _build_output_violations(data_dir: Path, snapshot: Snapshot) -> list[str]:
    problems: list[str] = []
    by_id = {build["build_id"]: build for build in snapshot.builds}
    builds_dir = data_dir / "builds"
    for entry in sorted(builds_dir.iterdir()) if builds_dir.is_dir() else []:
        build = by_id.get(entry.name)
        if build is None:
            problems.append(f"stray build output {entry.name}: no build record")
        elif build["state"] == "FAILED":
            problems.append(f"stray build output {entry.name}: the build FAILED")
    for build in snapshot.builds:
        if build["state"] != "SUCCESSFUL":
            continue
        artifacts = json.loads(build["artifacts"] or "{}")
        snapshot_dir = Path(artifacts.get("snapshotDir", "/nonexistent"))
        if not (snapshot_dir / "snapshot.json").is_file():
            problems.append(
                f"SUCCESSFUL build {build['build_id']} points at a missing snapshot {snapshot_dir}"
            )
        rootfs = Path(artifacts.get("rootfsDir", "/nonexistent"))
        if not rootfs.is_dir():
            problems.append(f"SUCCESSFUL build {build['build_id']} points at a missing rootfs {rootfs}")
    work = data_dir / "work"
    for entry in sorted(work.iterdir()) if work.is_dir() else []:
        problems.append(f"stray work dir {entry.name}")
    return problems


def buildah_export_leftovers(build_ids: set[str]) -> list[str]:
    """`openmicrovm-export-<build id>` containers of these builds still in the shared build store."""
    store = Path.home() / ".cache" / "openmicrovm" / "buildah" / "overlay" / "storage"
    containers = store / "overlay-containers" / "containers.json"
    try:
        listed = json.loads(containers.read_text())
    except (OSError, ValueError):
        return []
    names = {name for item in listed for name in item.get("names") or []}
    return sorted(
        f"buildah container {name}" for name in names if name.removeprefix("openmicrovm-export-") in build_ids
    )


@dataclass
class Ledger:
    """What the API acknowledged, so a check can ask whether every completed call's effect is still
    there. Keys are MicroVM ids / image ARNs; values the last acknowledged operation."""

    microvms: dict[str, str] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    versions: dict[tuple[str, str], str] = field(default_factory=dict)
    # Versions built from an artifact that builds: a crash may delay them, never fail them.
    good_versions: set[tuple[str, str]] = field(default_factory=set)
    # Calls whose answer never came (the server died under them): either outcome is legal.
    unknown: set[str] = field(default_factory=set)

    def effect_violations(self, snapshot: Snapshot) -> list[str]:
        problems: list[str] = []
        for vm, last in self.microvms.items():
            row = snapshot.microvm(vm)
            if row is None:
                problems.append(f"acknowledged {last} of {vm}: the MicroVM is gone")
                continue
            if vm in self.unknown:
                continue
            state, reason = row["state"], row["state_reason"]
            allowed = {
                "run": {"RUNNING"},
                "resume": {"RUNNING"},
                "suspend": {"SUSPENDED"},
                "terminate": {"TERMINATED"},
            }[last]
            if state not in allowed:
                problems.append(f"lost-{last}: acknowledged {last} of {vm}, which is now {state} ({reason})")
        for arn, last in self.images.items():
            row = snapshot.image(arn)
            if last == "delete":
                if row is not None:
                    problems.append(f"acknowledged delete of {arn}, which is still {row['state']}")
            elif row is None and arn not in self.unknown:
                problems.append(f"acknowledged {last} of {arn}: the image is gone")
        for (arn, version), last in self.versions.items():
            number = int(version.split(".")[0])
            exists = any(r["number"] == number for r in snapshot.versions_of(arn))
            if last == "delete" and exists:
                problems.append(f"acknowledged delete of {arn} {version}, which still exists")
            if last == "create" and not exists and self.images.get(arn) != "delete":
                problems.append(f"acknowledged update {arn} {version}: the version is gone")
        for arn, version in sorted(self.good_versions):
            number = int(version.split(".")[0])
            row = next((r for r in snapshot.versions_of(arn) if r["number"] == number), None)
            if row is not None and row["state"] not in ("SUCCESSFUL", "DELETING"):
                problems.append(
                    f"failed-build: {arn} {version} of a good artifact is {row['state']}: {row['state_reason']}"
                )
        return problems
