"""Records for the shipper to find, written through the store's repositories as the service
writes them.

The shipper's contract with the rest of the server is the store: which builds and MicroVMs
exist, in which state, with which `logging`. These helpers make exactly those records in a real
database so the shipper can be driven through outages step by step.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from openmicrovm.states import BuildState, MicrovmState, VersionState
from openmicrovm.store import Store, Tx

ACCOUNT = "000000000000"
REGION = "us-east-1"


class SettableClock:
    """The store's clock: the real time, or a moment a test names (a build finished long ago)."""

    def __init__(self) -> None:
        self.fixed: float | None = None

    def __call__(self) -> float:
        return time.time() if self.fixed is None else self.fixed


def add_image(store: Store, name: str, logging: dict[str, Any] | None) -> tuple[str, str]:
    """An image with version 1 and one build, both in progress; (image ARN, build id)."""
    arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:microvm-image:{name}"
    build_id = str(uuid.uuid4())
    config = {"codeArtifact": {"uri": "file:///nowhere.zip"}, "logging": logging}

    def add(tx: Tx) -> None:
        tx.images.create(arn, ACCOUNT, REGION, name, str(uuid.uuid4()), {})
        version = tx.versions.add(arn, tx.images.take_version_number(arn), config)
        tx.versions.transition(arn, version.number, VersionState.IN_PROGRESS)
        tx.builds.add(build_id, arn, version.number, "X86_64", "INTEL", "1")
        tx.builds.transition(build_id, BuildState.IN_PROGRESS)

    store.transact(add)
    return arn, build_id


def add_microvm(store: Store, image_arn: str, logging: dict[str, Any] | None) -> str:
    """A RUNNING MicroVM of version 1 of the image."""
    microvm_id = f"microvm-{uuid.uuid4()}"

    def add(tx: Tx) -> None:
        tx.microvms.add(
            microvm_id,
            ACCOUNT,
            REGION,
            image_arn,
            "1.0",
            f"{uuid.uuid4()}.lambda-microvm.{REGION}.localhost",
            512,
            28800,
            None,
            {"logging": logging},
        )
        tx.microvms.transition(microvm_id, MicrovmState.RUNNING)

    store.transact(add)
    return microvm_id


def finish_build(store: Store, clock: SettableClock, build_id: str, finished_at: float) -> None:
    clock.fixed = finished_at
    try:
        store.transact(lambda tx: tx.builds.transition(build_id, BuildState.SUCCESSFUL))
    finally:
        clock.fixed = None


def terminate_microvm(store: Store, microvm_id: str, at: float) -> None:
    store.transact(lambda tx: tx.microvms.transition(microvm_id, MicrovmState.TERMINATED, terminated_at=at))
