"""Image builds (one per target architecture of a version, spec §2.10–2.11, §3.3) and the state
changes the build engine reports, which settle the version and the image (spec §3.1–3.2)."""

from __future__ import annotations

from typing import Any

from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Result, Service, operation
from openmicrovm.service.errors import NotFoundError
from openmicrovm.service.pagination import paginate
from openmicrovm.service.views import load_version
from openmicrovm.states import UNFINISHED_BUILD_STATES, BuildState, ImageState, VersionState, VersionStatus
from openmicrovm.store import Tx
from openmicrovm.store.records import Build, version_label
from openmicrovm.store.repositories.builds import FILTER_COLUMNS

SNAPSHOT_SIZES = ("memorySnapshotSizeInBytes", "codeInstallSizeInBytes", "diskSnapshotSizeInBytes")
# How the image settles once every build of its version has ended: (busy state, all succeeded).
_SETTLED_IMAGE = {
    (ImageState.CREATING, False): ImageState.CREATE_FAILED,
    (ImageState.CREATING, True): ImageState.CREATED,
    (ImageState.UPDATING, False): ImageState.UPDATE_FAILED,
    (ImageState.UPDATING, True): ImageState.UPDATED,
}


def build_summary(build: Build) -> dict[str, Any]:
    return {
        "architecture": build.architecture,
        "buildId": build.build_id,
        "buildState": build.state.value,
        "chipset": build.chipset,
        "chipsetGeneration": build.chipset_generation,
        "createdAt": build.created_at,
        "imageArn": build.image_arn,
        "imageVersion": version_label(build.version_number),
        "stateReason": build.state_reason,
        "terminationReasonCode": None,  # undocumented, always null live
    }


@operation("ListMicrovmImageBuilds")
def list_builds(service: Service, context: RequestContext, params: Params) -> Result:
    image, version = service.read(
        lambda tx: load_version(tx, context, params["imageIdentifier"], params["imageVersion"])
    )
    filters = {member: params.get(member) for member in FILTER_COLUMNS}

    def fetch(after: list[Any] | None, limit: int) -> list[Build]:
        return service.read(lambda tx: tx.builds.page(image.arn, version.number, filters, after, limit))

    builds, token = paginate(
        service,
        context,
        "ListMicrovmImageBuilds",
        params,
        {"image": image.arn, "version": version.number, **filters},
        fetch,
        lambda build: [build.created_at, build.build_id],
    )
    return {"items": [build_summary(build) for build in builds], "nextToken": token}


@operation("GetMicrovmImageBuild")
def get_build(service: Service, context: RequestContext, params: Params) -> Result:
    def find(tx: Tx) -> Build | None:
        image, version = load_version(tx, context, params["imageIdentifier"], params["imageVersion"])
        build = tx.builds.get(params["buildId"])
        if build is None or (build.image_arn, build.version_number) != (image.arn, version.number):
            return None
        return build

    build = service.read(find)
    if build is None:
        raise NotFoundError(
            f"MicroVMImage build not found for MicroVMImage: {params['imageIdentifier']}, "
            f"Version: {params['imageVersion']}, BuildId: {params['buildId']}"
        )
    result = build_summary(build)
    artifacts = build.artifacts or {}
    sizes = {key: artifacts[key] for key in SNAPSHOT_SIZES if key in artifacts}
    result["snapshotBuild"] = sizes or None
    return result


def build_started(service: Service, build_id: str) -> bool:
    """PENDING (or IN_PROGRESS, after a restart) → IN_PROGRESS for the build, and its version.
    False when the build is gone or done."""

    def start(tx: Tx) -> bool:
        build = tx.builds.transition(build_id, BuildState.IN_PROGRESS, reason=None)
        if build is None:
            return False
        tx.versions.transition(
            build.image_arn, build.version_number, VersionState.IN_PROGRESS, expect=[VersionState.PENDING]
        )
        return True

    return service.transact(start)


def build_finished(
    service: Service,
    build_id: str,
    succeeded: bool,
    state_reason: str | None,
    artifacts: dict[str, Any] | None,
) -> None:
    """A build ended. Once every build of its version has, the version and the image settle."""

    def finish(tx: Tx) -> None:
        build = tx.builds.transition(
            build_id,
            BuildState.SUCCESSFUL if succeeded else BuildState.FAILED,
            expect=UNFINISHED_BUILD_STATES,
            reason=state_reason,
            artifacts=artifacts or None,
        )
        if build is None:
            return
        arn, number = build.image_arn, build.version_number
        siblings = tx.builds.of_version(arn, number)
        if any(sibling.state in UNFINISHED_BUILD_STATES for sibling in siblings):
            return
        failures = [sibling.state_reason for sibling in siblings if sibling.state is BuildState.FAILED]
        if failures:
            tx.versions.transition(
                arn,
                number,
                VersionState.FAILED,
                reason=f"One or more builds failed: {failures[0]}",
                status=VersionStatus.INACTIVE,
            )
        else:
            tx.versions.transition(
                arn, number, VersionState.SUCCESSFUL, reason=None, status=VersionStatus.ACTIVE
            )
        image = tx.images.get(arn)
        if image is not None and (image.state, not failures) in _SETTLED_IMAGE:
            tx.images.transition(
                arn, _SETTLED_IMAGE[(image.state, not failures)], reason=failures[0] if failures else None
            )

    service.transact(finish)
