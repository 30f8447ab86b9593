"""Image versions: read, list, activate/deactivate, delete (spec §2.6–2.9)."""

from __future__ import annotations

from typing import Any

from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Result, Service, operation
from openmicrovm.service.errors import ValidationError
from openmicrovm.service.images import LIVE_MICROVM_STATES, busy_conflict
from openmicrovm.service.pagination import paginate
from openmicrovm.service.records import find_image, load_image, load_version, version_detail, version_label
from openmicrovm.store.db import Row


def _refuse_while_busy(image: Row) -> None:
    """While a version builds or drains the image is CREATING/UPDATING, and version calls get 409."""
    if image["state"] in ("CREATING", "UPDATING", "DELETING"):
        raise busy_conflict(image)


@operation("GetMicrovmImageVersion")
def get_version(service: Service, context: RequestContext, params: Params) -> Result:
    image, version = load_version(service, context, params["imageIdentifier"], params["imageVersion"])
    return version_detail(image, version)


@operation("ListMicrovmImageVersions")
def list_versions(service: Service, context: RequestContext, params: Params) -> Result:
    image = load_image(service, context, params["imageIdentifier"])

    def fetch(after: list[Any] | None, limit: int) -> list[Row]:
        return service.db.all(
            "SELECT * FROM versions WHERE image_arn = ? AND number > ? ORDER BY number LIMIT ?",
            (image["arn"], after[0] if after else 0, limit),
        )

    rows, token = paginate(
        service,
        context,
        "ListMicrovmImageVersions",
        params,
        {"image": image["arn"]},
        fetch,
        lambda row: [row["number"]],
    )
    return {"items": [version_detail(image, row) for row in rows], "nextToken": token}


@operation("UpdateMicrovmImageVersion")
def update_version(service: Service, context: RequestContext, params: Params) -> Result:
    with service.transaction() as db:
        image, version = load_version(service, context, params["imageIdentifier"], params["imageVersion"])
        _refuse_while_busy(image)
        if version["state"] != "SUCCESSFUL":
            raise ValidationError(
                f"Only a SUCCESSFUL image version can be activated or deactivated; version "
                f"{version_label(version['number'])} is {version['state']}."
            )
        db.execute(
            "UPDATE versions SET status = ?, updated_at = ? WHERE image_arn = ? AND number = ?",
            (params["status"], service.clock(), image["arn"], version["number"]),
        )
        image, version = load_version(service, context, params["imageIdentifier"], params["imageVersion"])
        return version_detail(image, version)


@operation("DeleteMicrovmImageVersion")
def delete_version(service: Service, context: RequestContext, params: Params) -> Result:
    with service.transaction() as db:
        image, version = load_version(service, context, params["imageIdentifier"], params["imageVersion"])
        answer = {
            "imageIdentifier": image["arn"],
            "imageVersion": params["imageVersion"],
            "state": "DELETING",
        }
        if version["state"] == "DELETING":
            return answer
        _refuse_while_busy(image)
        remaining = db.scalar(
            "SELECT COUNT(*) FROM versions WHERE image_arn = ? AND state != 'DELETING'", (image["arn"],)
        )
        if remaining <= 1:
            raise ValidationError("This is the last version. Please delete the entire image")
        live = db.scalar(
            f"SELECT COUNT(*) FROM microvms WHERE image_arn = ? AND image_version = ? "
            f"AND state IN ({','.join('?' * len(LIVE_MICROVM_STATES))})",
            (image["arn"], params["imageVersion"], *LIVE_MICROVM_STATES),
        )
        if live:
            raise ValidationError("Cannot delete MicroVM image version with running microvms.")
        now = service.clock()
        db.execute(
            "UPDATE versions SET state = 'DELETING', updated_at = ? WHERE image_arn = ? AND number = ?",
            (now, image["arn"], version["number"]),
        )
        # The live service puts the image in UPDATING while the version drains.
        db.execute("UPDATE images SET state = 'UPDATING', updated_at = ? WHERE arn = ?", (now, image["arn"]))
        arn, number = image["arn"], version["number"]
        service.after_commit(lambda: service.builds.schedule_version_deletion(arn, number))
        return answer


def version_deleted(service: Service, image_arn: str, number: int) -> None:
    """The build engine freed the version's files: the record goes, the image settles."""
    with service.transaction() as db:
        db.execute(
            "DELETE FROM versions WHERE image_arn = ? AND number = ? AND state = 'DELETING'",
            (image_arn, number),
        )
        image = find_image(db, image_arn)
        if image is not None and image["state"] == "UPDATING":
            busy = db.scalar(
                "SELECT COUNT(*) FROM versions WHERE image_arn = ? AND state IN ('PENDING', 'IN_PROGRESS', 'DELETING')",
                (image_arn,),
            )
            if not busy:
                db.execute(
                    "UPDATE images SET state = 'UPDATED', updated_at = ? WHERE arn = ?",
                    (service.clock(), image_arn),
                )


def image_deleted(service: Service, image_arn: str) -> None:
    """Every version's files are gone: the image disappears (GET answers 404, as on AWS)."""
    with service.transaction() as db:
        db.execute("DELETE FROM images WHERE arn = ? AND state = 'DELETING'", (image_arn,))
