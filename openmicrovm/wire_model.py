"""The wire model: botocore's own lambda-microvms service model, loaded at run time."""

from __future__ import annotations

import functools

import botocore.session
from botocore.model import OperationModel, ServiceModel, Shape

SERVICE_NAME = "lambda-microvms"
API_VERSION = "2025-09-09"


class ModelMissing(RuntimeError):
    pass


@functools.cache
def service_model() -> ServiceModel:
    session = botocore.session.get_session()
    try:
        return session.get_service_model(SERVICE_NAME, API_VERSION)
    except Exception as error:  # botocore raises UnknownServiceError or DataNotFoundError
        raise ModelMissing(
            f"botocore {botocore.__version__} has no {SERVICE_NAME} {API_VERSION} model; "
            "install botocore>=1.44.8 (./install.sh does)"
        ) from error


@functools.cache
def version_config_members() -> tuple[str, ...]:
    """The members of an image version's configuration: what UpdateMicrovmImage takes and
    GetMicrovmImageVersion gives back, in the model's order (the order responses list them)."""
    model = service_model()
    returned = model.operation_model("GetMicrovmImageVersion").output_shape.members
    taken = model.operation_model("UpdateMicrovmImage").input_shape.members
    return tuple(name for name in taken if name in returned)


def operations() -> list[OperationModel]:
    model = service_model()
    return [model.operation_model(name) for name in model.operation_names]


def error_shape(code: str) -> Shape | None:
    try:
        return service_model().shape_for(code)
    except Exception:
        return None
