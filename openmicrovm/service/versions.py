"""Image versions: read, list, activate/deactivate, delete (spec §2.6–2.9), and the end of a
version's or an image's deletion, which the build engine reports."""

from __future__ import annotations

from typing import Any

from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Result, Service, operation
from openmicrovm.service.errors import ValidationError
from openmicrovm.service.images import busy_conflict
from openmicrovm.service.pagination import paginate
from openmicrovm.service.views import load_image, load_version, version_detail
from openmicrovm.states import BUSY_IMAGE_STATES, ImageState, VersionState, VersionStatus
from openmicrovm.store import Tx
from openmicrovm.store.records import Image, Version


def _refuse_while_busy(image: Image) -> None:
    """While a version builds or drains the image is CREATING/UPDATING, and version calls get 409."""
    if image.state in BUSY_IMAGE_STATES:
        raise busy_conflict(image)


@operation("GetMicrovmImageVersion")
def get_version(service: Service, context: RequestContext, params: Params) -> Result:
    image, version = service.read(
        lambda tx: load_version(tx, context, params["imageIdentifier"], params["imageVersion"])
    )
    return version_detail(image, version)


@operation("ListMicrovmImageVersions")
def list_versions(service: Service, context: RequestContext, params: Params) -> Result:
    image = service.read(lambda tx: load_image(tx, context, params["imageIdentifier"]))

    def fetch(after: list[Any] | None, limit: int) -> list[Version]:
        return service.read(lambda tx: tx.versions.page(image.arn, after, limit))

    versions, token = paginate(
        service,
        context,
        "ListMicrovmImageVersions",
        params,
        {"image": image.arn},
        fetch,
        lambda version: [version.number],
    )
    return {"items": [version_detail(image, version) for version in versions], "nextToken": token}


@operation("UpdateMicrovmImageVersion")
def update_version(service: Service, context: RequestContext, params: Params) -> Result:
    def perform(tx: Tx) -> Result:
        image, version = load_version(tx, context, params["imageIdentifier"], params["imageVersion"])
        _refuse_while_busy(image)
        changed = tx.versions.set_status(image.arn, version.number, VersionStatus(params["status"]))
        if changed is None:
            raise ValidationError(
                f"Only a SUCCESSFUL image version can be activated or deactivated; version "
                f"{version.label} is {version.state.value}."
            )
        return version_detail(image, changed)

    return service.transact(perform)


@operation("DeleteMicrovmImageVersion")
def delete_version(service: Service, context: RequestContext, params: Params) -> Result:
    def perform(tx: Tx) -> Result:
        image, version = load_version(tx, context, params["imageIdentifier"], params["imageVersion"])
        answer = {
            "imageIdentifier": image.arn,
            "imageVersion": params["imageVersion"],
            "state": VersionState.DELETING.value,
        }
        if version.state is VersionState.DELETING:
            return answer
        _refuse_while_busy(image)
        remaining = [state for state in VersionState if state is not VersionState.DELETING]
        if tx.versions.count(image.arn, remaining) <= 1:
            raise ValidationError("This is the last version. Please delete the entire image")
        if tx.microvms.count_live(image.arn, version.label):
            raise ValidationError("Cannot delete MicroVM image version with running microvms.")
        tx.versions.transition(
            image.arn, version.number, VersionState.DELETING, reason="DeleteMicrovmImageVersion"
        )
        # The live service puts the image in UPDATING while the version drains.
        tx.images.transition(
            image.arn, ImageState.UPDATING, reason=f"Version {version.label} is being deleted."
        )
        service.after_commit(tx, lambda: service.builds.schedule_version_deletion(image.arn, version.number))
        return answer

    return service.transact(perform)


def version_deleted(service: Service, image_arn: str, number: int) -> None:
    """The build engine freed the version's files: the record goes, the image settles."""

    def settle(tx: Tx) -> None:
        tx.versions.delete(image_arn, number)
        busy = (VersionState.PENDING, VersionState.IN_PROGRESS, VersionState.DELETING)
        if not tx.versions.count(image_arn, busy):
            tx.images.transition(image_arn, ImageState.UPDATED, expect=[ImageState.UPDATING], reason=None)

    service.transact(settle)


def image_deleted(service: Service, image_arn: str) -> None:
    """Every version's files are gone: the image disappears (GET answers 404, as on AWS)."""
    service.transact(lambda tx: tx.images.delete(image_arn))
