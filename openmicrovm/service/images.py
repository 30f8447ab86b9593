"""MicroVM images: create, read, list, update (a new version each time) and delete (spec §2.1–2.5)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from openmicrovm.service.arns import image_arn
from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Result, Service, operation
from openmicrovm.service.errors import ConflictError, QuotaExceededError, ValidationError
from openmicrovm.service.idempotency import idempotent
from openmicrovm.service.image_config import build_targets, sandbox_driver_name, version_config
from openmicrovm.service.managed import CHIPSETS
from openmicrovm.service.pagination import paginate
from openmicrovm.service.records import (
    IMAGE_SELECT,
    find_image,
    image_detail,
    image_summary,
    load_image,
    tags_of,
)
from openmicrovm.store.db import Database, Row

BUSY_STATES = ("CREATING", "UPDATING", "DELETING")
LIVE_MICROVM_STATES = ("PENDING", "RUNNING", "SUSPENDING", "SUSPENDED", "TERMINATING")


def busy_conflict(image: Row) -> ConflictError:
    return ConflictError(
        f"MicroVM Image is already in state: {image['state']}",
        resourceId=image["arn"],
        resourceType="MicrovmImage",
    )


def add_version(service: Service, db: Database, arn: str, number: int, config: dict[str, Any]) -> Row:
    """Insert a PENDING version with one PENDING build per target architecture; schedule the builds."""
    now = service.clock()
    db.execute(
        "INSERT INTO versions (image_arn, number, state, status, state_reason, created_at, updated_at, config) "
        "VALUES (?, ?, 'PENDING', 'INACTIVE', NULL, ?, ?, ?)",
        (arn, number, now, now, json.dumps(config)),
    )
    for architecture in build_targets(config):
        build_id = str(uuid.uuid4())
        chipset, generation = CHIPSETS.get(architecture, ("INTEL", "1"))
        db.execute(
            "INSERT INTO builds (build_id, image_arn, version_number, architecture, chipset, chipset_generation, "
            "state, state_reason, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'PENDING', NULL, ?, ?)",
            (build_id, arn, number, architecture, chipset, generation, now, now),
        )
        service.after_commit(lambda build_id=build_id: service.builds.schedule_build(build_id))
    version = db.one("SELECT * FROM versions WHERE image_arn = ? AND number = ?", (arn, number))
    assert version is not None
    return version


@operation("CreateMicrovmImage")
def create_image(service: Service, context: RequestContext, params: Params) -> Result:
    def perform() -> Result:
        config = version_config(context, params, sandbox_driver_name(service.builds))
        arn = image_arn(context, params["name"])
        db = service.db
        if find_image(db, arn) is not None:
            raise ValidationError(f"MicroVM image {params['name']} already exists.")
        quota = service.settings.quotas.images
        count = db.scalar(
            "SELECT COUNT(*) FROM images WHERE account = ? AND region = ?", (context.account, context.region)
        )
        if count >= quota:
            raise QuotaExceededError(
                f"You have reached the maximum number of MicroVM images ({quota}) for this account in "
                f"{context.region}. Delete an image or raise the 'images' quota."
            )
        now = service.clock()
        tags = params.get("tags")
        db.execute(
            "INSERT INTO images (arn, account, region, name, id, state, created_at, updated_at, next_version, tags) "
            "VALUES (?, ?, ?, ?, ?, 'CREATING', ?, ?, 2, ?)",
            (
                arn,
                context.account,
                context.region,
                params["name"],
                str(uuid.uuid4()),
                now,
                now,
                json.dumps(tags or {}),
            ),
        )
        version = add_version(service, db, arn, 1, config)
        image = find_image(db, arn)
        assert image is not None
        # Create echoes tags as null when none were given; Get answers {} (both as recorded live).
        return image_detail(image, version, tags or None)

    return idempotent(service, context, "CreateMicrovmImage", params, perform)


@operation("GetMicrovmImage")
def get_image(service: Service, context: RequestContext, params: Params) -> Result:
    image = load_image(service, context, params["imageIdentifier"])
    result = image_summary(image)
    result.update({"tags": tags_of(image), "updatedAt": image["updated_at"]})
    return result


@operation("ListMicrovmImages")
def list_images(service: Service, context: RequestContext, params: Params) -> Result:
    name_filter = params.get("nameFilter")

    def fetch(after: list[Any] | None, limit: int) -> list[Row]:
        sql = IMAGE_SELECT + " WHERE account = ? AND region = ?"
        args: list[Any] = [context.account, context.region]
        if name_filter is not None:
            # nameFilter is a substring ("contains") match, as the model documents.
            sql += " AND instr(name, ?) > 0"
            args.append(name_filter)
        if after is not None:
            sql += " AND (created_at > ? OR (created_at = ? AND arn > ?))"
            args += [after[0], after[0], after[1]]
        sql += " ORDER BY created_at, arn LIMIT ?"
        return service.db.all(sql, [*args, limit])

    rows, token = paginate(
        service,
        context,
        "ListMicrovmImages",
        params,
        {"nameFilter": name_filter},
        fetch,
        lambda row: [row["created_at"], row["arn"]],
    )
    return {"items": [image_summary(row) for row in rows], "nextToken": token}


@operation("UpdateMicrovmImage")
def update_image(service: Service, context: RequestContext, params: Params) -> Result:
    def perform() -> Result:
        image = load_image(service, context, params["imageIdentifier"])
        if image["state"] in BUSY_STATES:
            raise busy_conflict(image)
        config = version_config(context, params, sandbox_driver_name(service.builds))
        db = service.db
        quota = service.settings.quotas.versions_per_image
        count = db.scalar("SELECT COUNT(*) FROM versions WHERE image_arn = ?", (image["arn"],))
        if count >= quota:
            raise QuotaExceededError(
                f"The image {image['arn']} has reached the maximum number of versions ({quota}). "
                "Delete a version or raise the 'versions_per_image' quota."
            )
        number = image["next_version"]
        now = service.clock()
        db.execute(
            "UPDATE images SET state = 'UPDATING', updated_at = ?, next_version = ? WHERE arn = ?",
            (now, number + 1, image["arn"]),
        )
        version = add_version(service, db, image["arn"], number, config)
        updated = find_image(db, image["arn"])
        assert updated is not None
        result = image_detail(updated, version, None)
        del result["tags"]  # Update's output has no tags member
        return result

    return idempotent(service, context, "UpdateMicrovmImage", params, perform)


@operation("DeleteMicrovmImage")
def delete_image(service: Service, context: RequestContext, params: Params) -> Result:
    with service.transaction() as db:
        image = load_image(service, context, params["imageIdentifier"])
        answer = {"imageIdentifier": image["arn"], "state": "DELETING"}
        if image["state"] == "DELETING":
            return answer
        if image["state"] in ("CREATING", "UPDATING"):
            raise ValidationError(f"Cannot delete MicroVM image in its current state: {image['state']}")
        live = db.scalar(
            f"SELECT COUNT(*) FROM microvms WHERE image_arn = ? AND state IN ({','.join('?' * len(LIVE_MICROVM_STATES))})",
            (image["arn"], *LIVE_MICROVM_STATES),
        )
        if live:
            raise ValidationError("Cannot delete microvm image with running microvms.")
        now = service.clock()
        db.execute("UPDATE images SET state = 'DELETING', updated_at = ? WHERE arn = ?", (now, image["arn"]))
        db.execute(
            "UPDATE versions SET state = 'DELETING', updated_at = ? WHERE image_arn = ?", (now, image["arn"])
        )
        service.after_commit(lambda: service.builds.schedule_image_deletion(image["arn"]))
        return answer
