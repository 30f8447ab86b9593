"""Reading images and versions from the store, and the response projections built from them."""

from __future__ import annotations

import json
import re
from typing import Any

from openmicrovm.service.arns import require_own_image_arn
from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Service
from openmicrovm.service.errors import NotFoundError
from openmicrovm.service.image_config import CONFIG_MEMBERS
from openmicrovm.store.db import Database, Row

# latestActiveImageVersion / latestFailedImageVersion are derived from the versions, never stored twice.
IMAGE_SELECT = """
    SELECT images.*,
        (SELECT MAX(number) FROM versions v
          WHERE v.image_arn = images.arn AND v.state = 'SUCCESSFUL' AND v.status = 'ACTIVE') AS latest_active,
        (SELECT MAX(number) FROM versions v
          WHERE v.image_arn = images.arn AND v.state = 'FAILED') AS latest_failed
    FROM images
"""
_VERSION = re.compile(r"([1-9][0-9]{0,8})\.0")


def version_label(number: int | None) -> str | None:
    return None if number is None else f"{number}.0"


def version_number(label: str) -> int | None:
    match = _VERSION.fullmatch(label)
    return int(match.group(1)) if match else None


def image_not_found(arn: str) -> str:
    return f"MicroVMImage not found for MicroVMImageID: {arn}"


def version_not_found(arn: str, version: str) -> str:
    return f"MicroVMImage not found for MicroVMImage: {arn}, Version: {version}"


def find_image(db: Database, arn: str) -> Row | None:
    return db.one(IMAGE_SELECT + " WHERE images.arn = ?", (arn,))


def load_image(service: Service, context: RequestContext, identifier: str) -> Row:
    """The caller's image named by a full ARN, with the spec's errors for every other case."""
    arn = str(require_own_image_arn(context, identifier, image_not_found(identifier)))
    row = find_image(service.db, arn)
    if row is None:
        raise NotFoundError(image_not_found(identifier))
    return row


def load_version(service: Service, context: RequestContext, identifier: str, label: str) -> tuple[Row, Row]:
    image = load_image(service, context, identifier)
    number = version_number(label)
    row = None
    if number is not None:
        row = service.db.one(
            "SELECT * FROM versions WHERE image_arn = ? AND number = ?", (image["arn"], number)
        )
    if row is None:
        raise NotFoundError(version_not_found(identifier, label))
    return image, row


def tags_of(image: Row) -> dict[str, str]:
    return json.loads(image["tags"])


def image_summary(image: Row) -> dict[str, Any]:
    return {
        "createdAt": image["created_at"],
        "id": image["id"],
        "imageArn": image["arn"],
        "latestActiveImageVersion": version_label(image["latest_active"]),
        "latestFailedImageVersion": version_label(image["latest_failed"]),
        "name": image["name"],
        "state": image["state"],
    }


def version_detail(image: Row, version: Row) -> dict[str, Any]:
    config = json.loads(version["config"])
    detail: dict[str, Any] = {member: config.get(member) for member in CONFIG_MEMBERS}
    detail.update(
        {
            "imageArn": image["arn"],
            "imageVersion": version_label(version["number"]),
            "state": version["state"],
            "status": version["status"],
            "stateReason": version["state_reason"],
            "createdAt": version["created_at"],
            "updatedAt": version["updated_at"],
            "tags": tags_of(image),
        }
    )
    return detail


def image_detail(image: Row, version: Row, tags: dict[str, str] | None) -> dict[str, Any]:
    """The Create/Update response: the image with the full configuration of its new version."""
    config = json.loads(version["config"])
    detail: dict[str, Any] = image_summary(image)
    detail.update({member: config.get(member) for member in CONFIG_MEMBERS})
    detail.update(
        {
            "imageVersion": version_label(version["number"]),
            "updatedAt": image["updated_at"],
            "tags": tags,
            # Undocumented members the live service returns, always null so far (spec §12.5).
            "buildPhaseOverrides": None,
            "roleConfiguration": None,
        }
    )
    return detail
