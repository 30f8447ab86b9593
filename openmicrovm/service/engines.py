"""The seams between the domain and the engines that do the work (builder, sandbox lifecycle).

The service records what was asked and in which state things are; an engine does the slow part
in the background and reports back through the service's transition methods. With no engine
plugged in, nothing moves: versions and MicroVMs stay in their first state, as they must.
"""

from __future__ import annotations

from typing import Protocol


class BuildEngine(Protocol):
    def schedule_build(self, build_id: str) -> None:
        """Build this (PENDING) build in the background."""

    def schedule_version_deletion(self, image_arn: str, version_number: int) -> None:
        """Free the disk of a DELETING version, then report version_deleted."""

    def schedule_image_deletion(self, image_arn: str) -> None:
        """Free the disk of every version of a DELETING image, then report image_deleted."""


class MicrovmEngine(Protocol):
    def check_capacity(self, memory_mib: int, snapshot_memory_bytes: int) -> None:
        """Raise InsufficientCapacityError when this host cannot hold another MicroVM restored from
        a snapshot holding this much memory, limited to memory_mib."""

    def schedule_start(self, microvm_id: str) -> None: ...

    def schedule_suspend(self, microvm_id: str) -> None: ...

    def schedule_resume(self, microvm_id: str) -> None: ...

    def schedule_terminate(self, microvm_id: str) -> None: ...


class IdleBuildEngine:
    """No builder: builds stay PENDING."""

    def schedule_build(self, build_id: str) -> None:
        pass

    def schedule_version_deletion(self, image_arn: str, version_number: int) -> None:
        pass

    def schedule_image_deletion(self, image_arn: str) -> None:
        pass


class IdleMicrovmEngine:
    """No sandbox runtime: MicroVMs stay PENDING."""

    def check_capacity(self, memory_mib: int, snapshot_memory_bytes: int) -> None:
        pass

    def schedule_start(self, microvm_id: str) -> None:
        pass

    def schedule_suspend(self, microvm_id: str) -> None:
        pass

    def schedule_resume(self, microvm_id: str) -> None:
        pass

    def schedule_terminate(self, microvm_id: str) -> None:
        pass
