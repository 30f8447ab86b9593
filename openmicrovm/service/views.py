"""Finding the caller's images and versions, and the response projections built from records."""

from __future__ import annotations

import re
from typing import Any

from openmicrovm.service.arns import require_own_image_arn
from openmicrovm.service.context import RequestContext
from openmicrovm.service.errors import NotFoundError
from openmicrovm.service.image_config import CONFIG_MEMBERS
from openmicrovm.store import Tx
from openmicrovm.store.records import Image, Version, version_label

_VERSION = re.compile(r"([1-9][0-9]{0,8})\.0")


def version_number(label: str) -> int | None:
    match = _VERSION.fullmatch(label)
    return int(match.group(1)) if match else None


def image_not_found(arn: str) -> str:
    return f"MicroVMImage not found for MicroVMImageID: {arn}"


def version_not_found(arn: str, version: str) -> str:
    return f"MicroVMImage not found for MicroVMImage: {arn}, Version: {version}"


def load_image(tx: Tx, context: RequestContext, identifier: str) -> Image:
    """The caller's image named by a full ARN, with the spec's errors for every other case."""
    arn = str(require_own_image_arn(context, identifier, image_not_found(identifier)))
    image = tx.images.get(arn)
    if image is None:
        raise NotFoundError(image_not_found(identifier))
    return image


def load_version(tx: Tx, context: RequestContext, identifier: str, label: str) -> tuple[Image, Version]:
    image = load_image(tx, context, identifier)
    number = version_number(label)
    version = None if number is None else tx.versions.get(image.arn, number)
    if version is None:
        raise NotFoundError(version_not_found(identifier, label))
    return image, version


def image_summary(image: Image) -> dict[str, Any]:
    return {
        "createdAt": image.created_at,
        "id": image.id,
        "imageArn": image.arn,
        "latestActiveImageVersion": version_label(image.latest_active_version),
        "latestFailedImageVersion": version_label(image.latest_failed_version),
        "name": image.name,
        "state": image.state.value,
    }


def version_detail(image: Image, version: Version) -> dict[str, Any]:
    detail: dict[str, Any] = {member: version.config.get(member) for member in CONFIG_MEMBERS}
    detail.update(
        {
            "imageArn": image.arn,
            "imageVersion": version.label,
            "state": version.state.value,
            "status": version.status.value,
            "stateReason": version.state_reason,
            "createdAt": version.created_at,
            "updatedAt": version.updated_at,
            "tags": dict(image.tags),
        }
    )
    return detail


def image_detail(image: Image, version: Version, tags: dict[str, str] | None) -> dict[str, Any]:
    """The Create/Update response: the image with the full configuration of its new version."""
    detail: dict[str, Any] = image_summary(image)
    detail.update({member: version.config.get(member) for member in CONFIG_MEMBERS})
    detail.update(
        {
            "imageVersion": version.label,
            "updatedAt": image.updated_at,
            "tags": tags,
            # Undocumented members the live service returns, always null so far (spec §12.5).
            "buildPhaseOverrides": None,
            "roleConfiguration": None,
        }
    )
    return detail
