"""The typed records the repositories hand out: one frozen dataclass per stored resource.

Times are epoch seconds to the millisecond (what the wire carries). JSON columns arrive decoded:
`config` is a version's or a run's configuration exactly as the API received it, `artifacts`
what the builder left. Treat both as read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openmicrovm.states import BuildState, HostState, ImageState, MicrovmState, VersionState, VersionStatus


def version_label(number: int | None) -> str | None:
    """A version number as the API writes it ("3.0")."""
    return None if number is None else f"{number}.0"


@dataclass(frozen=True)
class Image:
    arn: str
    account: str
    region: str
    name: str
    id: str
    """The image's UUID (the API's `id`)."""
    state: ImageState
    state_reason: str | None
    """Why the image last changed state (kept for operators; not on the wire)."""
    created_at: float
    updated_at: float
    """Stamped by every state change."""
    next_version: int
    """The number the next UpdateMicrovmImage gives its version."""
    tags: dict[str, str]
    latest_active_version: int | None
    """The newest SUCCESSFUL and ACTIVE version, kept up to date by the versions repository."""
    latest_failed_version: int | None


@dataclass(frozen=True)
class Version:
    image_arn: str
    number: int
    state: VersionState
    status: VersionStatus
    state_reason: str | None
    created_at: float
    updated_at: float
    config: dict[str, Any]
    """The version's configuration as the API received it (CONFIG_MEMBERS and the artifact)."""

    @property
    def label(self) -> str:
        return f"{self.number}.0"


@dataclass(frozen=True)
class Build:
    build_id: str
    image_arn: str
    version_number: int
    architecture: str
    chipset: str
    chipset_generation: str
    state: BuildState
    state_reason: str | None
    created_at: float
    updated_at: float
    artifacts: dict[str, Any] | None
    """Where the builder put the rootfs and snapshot, the image config, snapshot sizes."""
    host_id: str | None = None
    """The host agent running (or that ran) the build; None until one takes it."""


@dataclass(frozen=True)
class BuildJob:
    """A build with what the build engine needs of its version and image."""

    build: Build
    image_name: str
    account: str
    region: str
    config: dict[str, Any]
    """The version's configuration."""

    @property
    def version(self) -> str:
        return f"{self.build.version_number}.0"


@dataclass(frozen=True)
class Microvm:
    id: str
    account: str
    region: str
    image_arn: str
    image_version: str
    """The version label ("1.0") the MicroVM runs."""
    state: MicrovmState
    state_reason: str | None
    state_changed_at: float
    endpoint: str
    """The endpoint hostname, unique to this MicroVM."""
    memory_mib: int
    """Memory counted against the account's quota while the MicroVM is live."""
    started_at: float
    terminated_at: float | None
    deadline_at: float
    """started_at + maximumDurationInSeconds: terminated then, suspended time included."""
    last_activity_at: float
    """The last endpoint traffic or resume: the idle timer counts from here."""
    suspended_at: float | None
    """When it was last suspended (the suspended time-to-live counts from here)."""
    max_idle_seconds: float | None
    suspended_ttl_seconds: float | None
    auto_resume: bool
    config: dict[str, Any]
    """The run's configuration (RUN_CONFIG_MEMBERS, the connectors, a pending runHookPayload)."""
    host_id: str | None = None
    """The host agent holding the MicroVM's sandbox (None: written before hosts existed)."""
    admission_mib: int = 0
    """Memory admitted for its start (snapshot footprint + 1/8 of its tier, runtime/host.py
    MemoryGate), counted against its host until it is RUNNING."""

    @property
    def version_number(self) -> int:
        return int(self.image_version.split(".")[0])


@dataclass(frozen=True)
class ClientTokenUse:
    """A clientToken already used: what it was used with, and the answer it got."""

    fingerprint: str
    response: dict[str, Any]


@dataclass(frozen=True)
class LogSource:
    """A build or MicroVM whose logs go to CloudWatch Logs, with what names them there."""

    stream: str
    """The log store stream: "builds/<id>" or "microvms/<id>"."""
    resource_id: str
    region: str
    image_name: str
    version: str
    cloudwatch: dict[str, Any]
    """The `logging.cloudWatch` member (logGroup, logStream, both optional)."""
    created_at: float
    finished_at: float | None
    """When it reached its final state; None while it runs."""


@dataclass(frozen=True)
class Host:
    """A host agent: where builds and sandboxes run (see openmicrovm/cluster/)."""

    id: str
    advertise_url: str
    """Where replicas reach the agent (http://IP:PORT)."""
    architecture: str
    """x86_64 or arm64 (the API's names)."""
    state: HostState
    state_reason: str | None
    available_mib: int
    """Memory MicroVMs may still take on it (RAM available less the reserve), at the last heartbeat."""
    build_slots: int
    """How many builds it runs at once."""
    registered_at: float
    heartbeat_at: float
    lease_expires_at: float
    """Past this, without a heartbeat, the host is lost (it stops its own sandboxes before then)."""
    incarnation: int
    """Counts its registrations: a lost host that comes back starts a new incarnation."""
