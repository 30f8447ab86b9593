"""Image builds (one per target architecture of a version, spec §2.10–2.11, §3.3) and the state
changes the build engine reports, which settle the version and the image (spec §3.1–3.2)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Result, Service, operation
from openmicrovm.service.errors import NotFoundError
from openmicrovm.service.pagination import paginate
from openmicrovm.service.records import load_version, version_label
from openmicrovm.store.db import Row

SNAPSHOT_SIZES = ("memorySnapshotSizeInBytes", "codeInstallSizeInBytes", "diskSnapshotSizeInBytes")


def build_summary(build: Row) -> dict[str, Any]:
    return {
        "architecture": build["architecture"],
        "buildId": build["build_id"],
        "buildState": build["state"],
        "chipset": build["chipset"],
        "chipsetGeneration": build["chipset_generation"],
        "createdAt": build["created_at"],
        "imageArn": build["image_arn"],
        "imageVersion": version_label(build["version_number"]),
        "stateReason": build["state_reason"],
        "terminationReasonCode": None,  # undocumented, always null live
    }


@operation("ListMicrovmImageBuilds")
def list_builds(service: Service, context: RequestContext, params: Params) -> Result:
    image, version = load_version(service, context, params["imageIdentifier"], params["imageVersion"])
    filters = {key: params.get(key) for key in ("architecture", "chipset", "chipsetGeneration")}

    def fetch(after: list[Any] | None, limit: int) -> list[Row]:
        sql = "SELECT * FROM builds WHERE image_arn = ? AND version_number = ?"
        args: list[Any] = [image["arn"], version["number"]]
        for column, key in (
            ("architecture", "architecture"),
            ("chipset", "chipset"),
            ("chipset_generation", "chipsetGeneration"),
        ):
            if filters[key] is not None:
                sql += f" AND {column} = ?"
                args.append(filters[key])
        if after is not None:
            sql += " AND (created_at > ? OR (created_at = ? AND build_id > ?))"
            args += [after[0], after[0], after[1]]
        return service.db.all(sql + " ORDER BY created_at, build_id LIMIT ?", [*args, limit])

    rows, token = paginate(
        service,
        context,
        "ListMicrovmImageBuilds",
        params,
        {"image": image["arn"], "version": version["number"], **filters},
        fetch,
        lambda row: [row["created_at"], row["build_id"]],
    )
    return {"items": [build_summary(row) for row in rows], "nextToken": token}


@operation("GetMicrovmImageBuild")
def get_build(service: Service, context: RequestContext, params: Params) -> Result:
    image, version = load_version(service, context, params["imageIdentifier"], params["imageVersion"])
    build = service.db.one(
        "SELECT * FROM builds WHERE build_id = ? AND image_arn = ? AND version_number = ?",
        (params["buildId"], image["arn"], version["number"]),
    )
    if build is None:
        raise NotFoundError(
            f"MicroVMImage build not found for MicroVMImage: {params['imageIdentifier']}, "
            f"Version: {params['imageVersion']}, BuildId: {params['buildId']}"
        )
    result = build_summary(build)
    artifacts = json.loads(build["artifacts"]) if build["artifacts"] else {}
    sizes = {key: artifacts[key] for key in SNAPSHOT_SIZES if key in artifacts}
    result["snapshotBuild"] = sizes or None
    return result


@dataclass(frozen=True)
class BuildJob:
    """What the build engine needs to know about one build."""

    build_id: str
    state: str
    image_arn: str
    image_name: str
    region: str
    account: str
    version_number: int
    architecture: str
    config: dict[str, Any]
    artifacts: dict[str, Any] | None

    @property
    def version(self) -> str:
        return f"{self.version_number}.0"


def load_build_job(service: Service, build_id: str) -> BuildJob | None:
    row = service.db.one(
        "SELECT b.*, v.config, i.name, i.region, i.account FROM builds b "
        "JOIN versions v ON v.image_arn = b.image_arn AND v.number = b.version_number "
        "JOIN images i ON i.arn = b.image_arn WHERE b.build_id = ?",
        (build_id,),
    )
    if row is None:
        return None
    return BuildJob(
        build_id=row["build_id"],
        state=row["state"],
        image_arn=row["image_arn"],
        image_name=row["name"],
        region=row["region"],
        account=row["account"],
        version_number=row["version_number"],
        architecture=row["architecture"],
        config=json.loads(row["config"]),
        artifacts=json.loads(row["artifacts"]) if row["artifacts"] else None,
    )


def unfinished_build_ids(service: Service) -> list[str]:
    rows = service.db.all(
        "SELECT build_id FROM builds WHERE state IN ('PENDING', 'IN_PROGRESS') ORDER BY created_at"
    )
    return [row["build_id"] for row in rows]


def build_started(service: Service, build_id: str) -> bool:
    """PENDING → IN_PROGRESS for the build and its version. False when the build is gone or done."""
    with service.transaction() as db:
        build = db.one("SELECT * FROM builds WHERE build_id = ?", (build_id,))
        if build is None or build["state"] not in ("PENDING", "IN_PROGRESS"):
            return False
        now = service.clock()
        db.execute(
            "UPDATE builds SET state = 'IN_PROGRESS', updated_at = ? WHERE build_id = ?", (now, build_id)
        )
        db.execute(
            "UPDATE versions SET state = 'IN_PROGRESS', updated_at = ? "
            "WHERE image_arn = ? AND number = ? AND state = 'PENDING'",
            (now, build["image_arn"], build["version_number"]),
        )
        return True


def build_finished(
    service: Service,
    build_id: str,
    succeeded: bool,
    state_reason: str | None,
    artifacts: dict[str, Any] | None,
) -> None:
    """A build ended. Once every build of its version has, the version and the image settle."""
    with service.transaction() as db:
        build = db.one("SELECT * FROM builds WHERE build_id = ?", (build_id,))
        if build is None or build["state"] not in ("PENDING", "IN_PROGRESS"):
            return
        now = service.clock()
        db.execute(
            "UPDATE builds SET state = ?, state_reason = ?, artifacts = ?, updated_at = ? WHERE build_id = ?",
            (
                "SUCCESSFUL" if succeeded else "FAILED",
                state_reason,
                json.dumps(artifacts) if artifacts else None,
                now,
                build_id,
            ),
        )
        arn, number = build["image_arn"], build["version_number"]
        builds = db.all(
            "SELECT state, state_reason FROM builds WHERE image_arn = ? AND version_number = ?", (arn, number)
        )
        if any(b["state"] in ("PENDING", "IN_PROGRESS") for b in builds):
            return
        failures = [b["state_reason"] for b in builds if b["state"] == "FAILED"]
        if failures:
            version_state, status = "FAILED", "INACTIVE"
            reason = f"One or more builds failed: {failures[0]}"
        else:
            version_state, status, reason = "SUCCESSFUL", "ACTIVE", None
        db.execute(
            "UPDATE versions SET state = ?, status = ?, state_reason = ?, updated_at = ? "
            "WHERE image_arn = ? AND number = ? AND state IN ('PENDING', 'IN_PROGRESS')",
            (version_state, status, reason, now, arn, number),
        )
        settle = {
            ("CREATING", False): "CREATE_FAILED",
            ("CREATING", True): "CREATED",
            ("UPDATING", False): "UPDATE_FAILED",
            ("UPDATING", True): "UPDATED",
        }
        image = db.one("SELECT state FROM images WHERE arn = ?", (arn,))
        if image is not None and (image["state"], not failures) in settle:
            db.execute(
                "UPDATE images SET state = ?, updated_at = ? WHERE arn = ?",
                (settle[(image["state"], not failures)], now, arn),
            )
