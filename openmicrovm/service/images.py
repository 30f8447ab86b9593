"""MicroVM images: create, read, list, update (a new version each time) and delete (spec §2.1–2.5)."""

from __future__ import annotations

import uuid
from typing import Any

from openmicrovm.service.arns import image_arn
from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Result, Service, operation
from openmicrovm.service.errors import ConflictError, QuotaExceededError, ValidationError
from openmicrovm.service.idempotency import idempotent
from openmicrovm.service.image_config import build_targets, version_config
from openmicrovm.service.managed import CHIPSETS
from openmicrovm.service.pagination import paginate
from openmicrovm.service.views import image_detail, image_summary, load_image
from openmicrovm.states import BUSY_IMAGE_STATES, ImageState, VersionState
from openmicrovm.store import Tx
from openmicrovm.store.records import Image, Version


def busy_conflict(image: Image) -> ConflictError:
    return ConflictError(
        f"MicroVM Image is already in state: {image.state.value}",
        resourceId=image.arn,
        resourceType="MicrovmImage",
    )


def add_version(service: Service, tx: Tx, arn: str, config: dict[str, Any]) -> Version:
    """A PENDING version with one PENDING build per target architecture; the builds are scheduled."""
    version = tx.versions.add(arn, tx.images.take_version_number(arn), config)
    for architecture in build_targets(config):
        chipset, generation = CHIPSETS.get(architecture, ("INTEL", "1"))
        build = tx.builds.add(str(uuid.uuid4()), arn, version.number, architecture, chipset, generation)
        service.after_commit(tx, lambda build_id=build.build_id: service.builds.schedule_build(build_id))
    return version


@operation("CreateMicrovmImage")
def create_image(service: Service, context: RequestContext, params: Params) -> Result:
    config = version_config(context, params, service.builds.sandbox_driver())
    arn = image_arn(context, params["name"])

    def perform(tx: Tx) -> Result:
        if tx.images.get(arn) is not None:
            raise ValidationError(f"MicroVM image {params['name']} already exists.")
        quota = service.settings.quotas.images
        if tx.images.count(context.account, context.region) >= quota:
            raise QuotaExceededError(
                f"You have reached the maximum number of MicroVM images ({quota}) for this account in "
                f"{context.region}. Delete an image or raise the 'images' quota."
            )
        tags = params.get("tags")
        tx.images.create(arn, context.account, context.region, params["name"], str(uuid.uuid4()), tags or {})
        version = add_version(service, tx, arn, config)
        image = tx.images.get(arn)
        assert image is not None
        # Create echoes tags as null when none were given; Get answers {} (both as recorded live).
        return image_detail(image, version, tags or None)

    return idempotent(service, context, "CreateMicrovmImage", params, perform)


@operation("GetMicrovmImage")
def get_image(service: Service, context: RequestContext, params: Params) -> Result:
    image = service.read(lambda tx: load_image(tx, context, params["imageIdentifier"]))
    result = image_summary(image)
    result.update({"tags": dict(image.tags), "updatedAt": image.updated_at})
    return result


@operation("ListMicrovmImages")
def list_images(service: Service, context: RequestContext, params: Params) -> Result:
    name_filter = params.get("nameFilter")

    def fetch(after: list[Any] | None, limit: int) -> list[Image]:
        # nameFilter is a substring ("contains") match, as the model documents.
        return service.read(
            lambda tx: tx.images.page(context.account, context.region, name_filter, after, limit)
        )

    images, token = paginate(
        service,
        context,
        "ListMicrovmImages",
        params,
        {"nameFilter": name_filter},
        fetch,
        lambda image: [image.created_at, image.arn],
    )
    return {"items": [image_summary(image) for image in images], "nextToken": token}


@operation("UpdateMicrovmImage")
def update_image(service: Service, context: RequestContext, params: Params) -> Result:
    def perform(tx: Tx) -> Result:
        image = load_image(tx, context, params["imageIdentifier"])
        if image.state in BUSY_IMAGE_STATES:
            raise busy_conflict(image)
        config = version_config(context, params, service.builds.sandbox_driver())
        quota = service.settings.quotas.versions_per_image
        if tx.versions.count(image.arn) >= quota:
            raise QuotaExceededError(
                f"The image {image.arn} has reached the maximum number of versions ({quota}). "
                "Delete a version or raise the 'versions_per_image' quota."
            )
        if tx.images.transition(image.arn, ImageState.UPDATING, reason="A new version is building.") is None:
            raise busy_conflict(image)
        version = add_version(service, tx, image.arn, config)
        updated = tx.images.get(image.arn)
        assert updated is not None
        result = image_detail(updated, version, None)
        del result["tags"]  # Update's output has no tags member
        return result

    return idempotent(service, context, "UpdateMicrovmImage", params, perform)


@operation("DeleteMicrovmImage")
def delete_image(service: Service, context: RequestContext, params: Params) -> Result:
    def perform(tx: Tx) -> Result:
        image = load_image(tx, context, params["imageIdentifier"])
        answer = {"imageIdentifier": image.arn, "state": ImageState.DELETING.value}
        if image.state is ImageState.DELETING:
            return answer
        if image.state in (ImageState.CREATING, ImageState.UPDATING):
            raise ValidationError(f"Cannot delete MicroVM image in its current state: {image.state.value}")
        if tx.microvms.count_live(image.arn):
            raise ValidationError("Cannot delete microvm image with running microvms.")
        tx.images.transition(image.arn, ImageState.DELETING, reason="DeleteMicrovmImage")
        for version in tx.versions.of_image(image.arn):
            tx.versions.transition(
                image.arn, version.number, VersionState.DELETING, reason="DeleteMicrovmImage"
            )
        service.after_commit(tx, lambda: service.builds.schedule_image_deletion(image.arn))
        return answer

    return service.transact(perform)
