"""Rows of the real schema for the shipper to find, written the way the service writes them.

The shipper's contract with the rest of the server is the store's schema: which builds and
MicroVMs exist, in which state, with which `logging`. These helpers write exactly those rows
into a real database so the shipper can be driven through outages step by step.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from openmicrovm.store.db import Database

ACCOUNT = "000000000000"
REGION = "us-east-1"


def add_image(db: Database, name: str, logging: dict[str, Any] | None) -> tuple[str, str]:
    """An image with version 1 and one build; (image ARN, build id)."""
    now = time.time()
    arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:microvm-image:{name}"
    build_id = str(uuid.uuid4())
    config = {"codeArtifact": {"uri": "file:///nowhere.zip"}, "logging": logging}
    with db.transaction():
        db.execute(
            "INSERT INTO images (arn, account, region, name, id, state, created_at, updated_at, next_version, tags) "
            "VALUES (?, ?, ?, ?, ?, 'CREATING', ?, ?, 2, '{}')",
            (arn, ACCOUNT, REGION, name, str(uuid.uuid4()), now, now),
        )
        db.execute(
            "INSERT INTO versions (image_arn, number, state, status, state_reason, created_at, updated_at, config) "
            "VALUES (?, 1, 'IN_PROGRESS', 'INACTIVE', NULL, ?, ?, ?)",
            (arn, now, now, json.dumps(config)),
        )
        db.execute(
            "INSERT INTO builds (build_id, image_arn, version_number, architecture, chipset, chipset_generation, "
            "state, state_reason, created_at, updated_at) VALUES (?, ?, 1, 'X86_64', 'INTEL', '1', 'IN_PROGRESS', "
            "NULL, ?, ?)",
            (build_id, arn, now, now),
        )
    return arn, build_id


def add_microvm(db: Database, image_arn: str, logging: dict[str, Any] | None) -> str:
    now = time.time()
    microvm_id = f"microvm-{uuid.uuid4()}"
    db.execute(
        "INSERT INTO microvms (id, account, region, image_arn, image_version, state, state_reason, endpoint, "
        "memory_mib, started_at, terminated_at, deadline_at, last_activity_at, suspended_at, config) "
        "VALUES (?, ?, ?, ?, '1.0', 'RUNNING', NULL, ?, 512, ?, NULL, ?, ?, NULL, ?)",
        (
            microvm_id,
            ACCOUNT,
            REGION,
            image_arn,
            f"{uuid.uuid4()}.lambda-microvm.{REGION}.localhost",
            now,
            now + 28800,
            now,
            json.dumps({"logging": logging}),
        ),
    )
    return microvm_id


def finish_build(db: Database, build_id: str, finished_at: float) -> None:
    db.execute(
        "UPDATE builds SET state = 'SUCCESSFUL', updated_at = ? WHERE build_id = ?", (finished_at, build_id)
    )


def terminate_microvm(db: Database, microvm_id: str, at: float) -> None:
    db.execute("UPDATE microvms SET state = 'TERMINATED', terminated_at = ? WHERE id = ?", (at, microvm_id))
