"""The catalog of managed (base) MicroVM images: today one, al2023-1, as on AWS.

Ours is backed by a local Debian root filesystem (see builder/base_rootfs.py), and it supports
the architecture of this host only, which is what supportedCpuConfigurations says.
"""

from __future__ import annotations

import platform

from openmicrovm.service.arns import MANAGED_ACCOUNT, parse_image_arn
from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Result, Service, operation
from openmicrovm.service.errors import NotFoundError, ValidationError
from openmicrovm.service.pagination import paginate

MANAGED_IMAGE_NAME = "al2023-1"
# Managed versions are plain integers, newest first; a build echoes the resolved one as "<n>.0".
MANAGED_VERSIONS = ("1",)
# When this catalog entry was published (the service's launch day); it never changes at run time.
PUBLISHED_AT = 1782086400.0  # 2026-06-22T00:00:00Z

_ARCHITECTURES = {"x86_64": "X86_64", "amd64": "X86_64", "aarch64": "ARM_64", "arm64": "ARM_64"}
CHIPSETS = {"X86_64": ("INTEL", "1"), "ARM_64": ("GRAVITON", "3")}


def host_architecture() -> str:
    machine = platform.machine().lower()
    return _ARCHITECTURES.get(machine, machine.upper())


def managed_image_arn(region: str) -> str:
    return f"arn:aws:lambda:{region}:{MANAGED_ACCOUNT}:microvm-image:{MANAGED_IMAGE_NAME}"


def resolve_base_image(context: RequestContext, base_image_arn: str, base_image_version: str | None) -> str:
    """Check a baseImageArn/baseImageVersion pair; returns the resolved version as echoed ("1.0")."""
    arn = parse_image_arn(base_image_arn)
    if arn.account != MANAGED_ACCOUNT or arn.name != MANAGED_IMAGE_NAME or arn.region != context.region:
        raise NotFoundError(f"MicroVMImage not found for MicroVMImageID: {base_image_arn}")
    if base_image_version is None:
        return f"{MANAGED_VERSIONS[0]}.0"
    if base_image_version not in MANAGED_VERSIONS:
        raise ValidationError(
            f"Base MicroVM image version {base_image_version} is not available for {base_image_arn}. "
            f"Available versions: [{', '.join(MANAGED_VERSIONS)}] (see ListManagedMicrovmImageVersions)."
        )
    return f"{base_image_version}.0"


@operation("ListManagedMicrovmImages")
def list_managed_images(service: Service, context: RequestContext, params: Params) -> Result:
    catalog = [
        {"imageArn": managed_image_arn(context.region), "createdAt": PUBLISHED_AT, "updatedAt": PUBLISHED_AT}
    ]
    items, token = paginate(
        service,
        context,
        "ListManagedMicrovmImages",
        params,
        {},
        lambda after, limit: [i for i in catalog if after is None or i["imageArn"] > after[0]][:limit],
        lambda item: [item["imageArn"]],
    )
    return {"items": items, "nextToken": token}


@operation("ListManagedMicrovmImageVersions")
def list_managed_image_versions(service: Service, context: RequestContext, params: Params) -> Result:
    identifier = params["imageIdentifier"]
    arn = parse_image_arn(identifier)
    if arn.account != MANAGED_ACCOUNT or arn.name != MANAGED_IMAGE_NAME or arn.region != context.region:
        raise NotFoundError(f"MicroVMImage not found for MicroVMImageID: {identifier}")
    versions = [
        {
            "imageArn": managed_image_arn(context.region),
            "imageVersion": version,
            "status": "AVAILABLE",
            "supportedCpuConfigurations": [{"architecture": host_architecture()}],
            "createdAt": PUBLISHED_AT,
            "updatedAt": PUBLISHED_AT,
        }
        for version in MANAGED_VERSIONS
    ]
    items, token = paginate(
        service,
        context,
        "ListManagedMicrovmImageVersions",
        params,
        {"image": identifier},
        lambda after, limit: [v for v in versions if after is None or int(v["imageVersion"]) < after[0]][
            :limit
        ],
        lambda item: [int(item["imageVersion"])],
    )
    return {"items": items, "nextToken": token}
