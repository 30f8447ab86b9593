"""The states of every resource and the moves between them, in one place.

Each resource has an enum of its states and a table of the moves allowed from each one. The
store's `transition()` methods are the only writers of a state column: they move a record only
along this table (a compare-and-set in one statement, so a move that lost a race simply finds
the state already moved on), stamp the time and record the reason.

The wire shows the API's states. A MicroVM on its way back from SUSPENDED is RESUMING here and
PENDING on the wire (the brief PENDING AWS shows while resuming, spec §2.18).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import TypeVar


class ImageState(StrEnum):
    CREATING = "CREATING"
    CREATED = "CREATED"
    CREATE_FAILED = "CREATE_FAILED"
    UPDATING = "UPDATING"
    UPDATED = "UPDATED"
    UPDATE_FAILED = "UPDATE_FAILED"
    DELETING = "DELETING"


class VersionState(StrEnum):
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCESSFUL = "SUCCESSFUL"
    FAILED = "FAILED"
    DELETING = "DELETING"


class VersionStatus(StrEnum):
    """Whether a SUCCESSFUL version may be run; the user switches it, it is not a lifecycle state."""

    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"


class BuildState(StrEnum):
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCESSFUL = "SUCCESSFUL"
    FAILED = "FAILED"


class MicrovmState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUSPENDING = "SUSPENDING"
    SUSPENDED = "SUSPENDED"
    RESUMING = "RESUMING"
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"

    @property
    def wire(self) -> str:
        """The state the API shows."""
        return MicrovmState.PENDING.value if self is MicrovmState.RESUMING else self.value


# Images settle from their busy states when the work on their versions ends; a settled image
# becomes busy again for a new version, a version deletion, or its own deletion.
_SETTLED_IMAGE = (ImageState.UPDATING, ImageState.DELETING)
IMAGE_MOVES: Mapping[ImageState, frozenset[ImageState]] = {
    ImageState.CREATING: frozenset({ImageState.CREATED, ImageState.CREATE_FAILED}),
    ImageState.CREATED: frozenset(_SETTLED_IMAGE),
    ImageState.CREATE_FAILED: frozenset(_SETTLED_IMAGE),
    ImageState.UPDATED: frozenset(_SETTLED_IMAGE),
    ImageState.UPDATE_FAILED: frozenset(_SETTLED_IMAGE),
    ImageState.UPDATING: frozenset({ImageState.UPDATED, ImageState.UPDATE_FAILED}),
    ImageState.DELETING: frozenset(),  # the record is removed once its files are
}

VERSION_MOVES: Mapping[VersionState, frozenset[VersionState]] = {
    VersionState.PENDING: frozenset(
        {VersionState.IN_PROGRESS, VersionState.SUCCESSFUL, VersionState.FAILED, VersionState.DELETING}
    ),
    VersionState.IN_PROGRESS: frozenset(
        {VersionState.SUCCESSFUL, VersionState.FAILED, VersionState.DELETING}
    ),
    VersionState.SUCCESSFUL: frozenset({VersionState.DELETING}),
    VersionState.FAILED: frozenset({VersionState.DELETING}),
    VersionState.DELETING: frozenset(),
}

BUILD_MOVES: Mapping[BuildState, frozenset[BuildState]] = {
    BuildState.PENDING: frozenset({BuildState.IN_PROGRESS, BuildState.SUCCESSFUL, BuildState.FAILED}),
    # IN_PROGRESS → IN_PROGRESS: a build a restart interrupted starts again from the beginning.
    BuildState.IN_PROGRESS: frozenset({BuildState.IN_PROGRESS, BuildState.SUCCESSFUL, BuildState.FAILED}),
    BuildState.SUCCESSFUL: frozenset(),
    BuildState.FAILED: frozenset(),
}

_M = MicrovmState
MICROVM_MOVES: Mapping[MicrovmState, frozenset[MicrovmState]] = {
    # Every live state may be asked to terminate, or be terminated at once after a failure.
    _M.PENDING: frozenset({_M.RUNNING, _M.TERMINATING, _M.TERMINATED}),
    _M.RUNNING: frozenset({_M.SUSPENDING, _M.TERMINATING, _M.TERMINATED}),
    _M.SUSPENDING: frozenset({_M.SUSPENDED, _M.TERMINATING, _M.TERMINATED}),
    _M.SUSPENDED: frozenset({_M.RESUMING, _M.TERMINATING, _M.TERMINATED}),
    _M.RESUMING: frozenset({_M.RUNNING, _M.TERMINATING, _M.TERMINATED}),
    _M.TERMINATING: frozenset({_M.TERMINATED}),
    _M.TERMINATED: frozenset(),
}


class HostState(StrEnum):
    """A host agent, as the cluster sees it (store/repositories/hosts.py)."""

    ACTIVE = "ACTIVE"  # holds its lease: MicroVMs and builds may be placed on it
    LOST = "LOST"  # its lease expired: its MicroVMs were terminated, its builds handed on


HOST_MOVES: Mapping[HostState, frozenset[HostState]] = {
    # A lost host that comes back registers again: a new incarnation with nothing on it.
    HostState.ACTIVE: frozenset({HostState.LOST}),
    HostState.LOST: frozenset({HostState.ACTIVE}),
}

# MicroVMs that hold memory and count against the quota, and that keep their image in use.
LIVE_MICROVM_STATES = frozenset(state for state in MicrovmState if state is not MicrovmState.TERMINATED)
# Images whose versions are building or draining: version calls get a ConflictException.
BUSY_IMAGE_STATES = frozenset({ImageState.CREATING, ImageState.UPDATING, ImageState.DELETING})
UNFINISHED_BUILD_STATES = frozenset({BuildState.PENDING, BuildState.IN_PROGRESS})
FINISHED_BUILD_STATES = frozenset({BuildState.SUCCESSFUL, BuildState.FAILED})


S = TypeVar("S", bound=StrEnum)


def sources(moves: Mapping[S, frozenset[S]], to: S, expect: Iterable[S] | None = None) -> list[S]:
    """The states from which `to` may be reached, narrowed to `expect` when given, in table order."""
    allowed = [state for state, targets in moves.items() if to in targets]
    if expect is None:
        return allowed
    wanted = set(expect)
    return [state for state in allowed if state in wanted]
