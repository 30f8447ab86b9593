"""The seams between the domain and the engines that do the work (builder, sandbox lifecycle).

The service records what was asked and in which state things are; an engine does the slow part
in the background and reports back through the service's transition methods. With no engine
plugged in, nothing moves: versions and MicroVMs stay in their first state, as they must.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from openmicrovm.store import Tx
from openmicrovm.store.records import Version


@dataclass(frozen=True)
class Placement:
    """Where a new MicroVM goes, decided inside the RunMicrovm transaction."""

    host_id: str | None  # the host agent that will hold it (None: no hosts, nothing will run it)
    admission_mib: int  # memory admitted for its start, counted against that host until RUNNING


class BuildEngine(Protocol):
    def sandbox_driver(self) -> str | None:
        """The name of the sandbox driver builds run on here ("gvisor", "process"), where known."""

    def schedule_build(self, build_id: str) -> None:
        """Build this (PENDING) build in the background."""

    def schedule_version_deletion(self, image_arn: str, version_number: int) -> None:
        """Free the disk of a DELETING version, then report version_deleted."""

    def schedule_image_deletion(self, image_arn: str) -> None:
        """Free the disk of every version of a DELETING image, then report image_deleted."""


class MicrovmEngine(Protocol):
    def place(self, tx: Tx, version: Version, memory_mib: int) -> Placement:
        """Choose the host for a new MicroVM of `version` limited to memory_mib; raise
        InsufficientCapacityError when no host can hold it."""

    def schedule_start(self, microvm_id: str) -> None: ...

    def schedule_suspend(self, microvm_id: str) -> None: ...

    def schedule_resume(self, microvm_id: str) -> None: ...

    def schedule_terminate(self, microvm_id: str) -> None: ...


class IdleBuildEngine:
    """No builder: builds stay PENDING."""

    def sandbox_driver(self) -> str | None:
        return None

    def schedule_build(self, build_id: str) -> None:
        pass

    def schedule_version_deletion(self, image_arn: str, version_number: int) -> None:
        pass

    def schedule_image_deletion(self, image_arn: str) -> None:
        pass


class IdleMicrovmEngine:
    """No sandbox runtime: MicroVMs stay PENDING."""

    def place(self, tx: Tx, version: Version, memory_mib: int) -> Placement:
        return Placement(None, 0)

    def schedule_start(self, microvm_id: str) -> None:
        pass

    def schedule_suspend(self, microvm_id: str) -> None:
        pass

    def schedule_resume(self, microvm_id: str) -> None:
        pass

    def schedule_terminate(self, microvm_id: str) -> None:
        pass
