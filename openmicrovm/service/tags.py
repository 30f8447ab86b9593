"""Tags on MicroVM images through the classic Lambda tagging API (spec §2.22–2.24)."""

from __future__ import annotations

import re

from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Result, Service, operation
from openmicrovm.service.errors import InvalidParameterValueError, NotFoundError
from openmicrovm.service.views import load_image
from openmicrovm.states import ImageState
from openmicrovm.store import Tx
from openmicrovm.store.records import Image

MAX_TAGS = 50  # Lambda's limit of tags per resource
_IMAGE_RESOURCE = re.compile(r"arn:[^:]+:lambda:[^:]+:[^:]+:microvm-image:.+")


def _image_for(tx: Tx, context: RequestContext, resource: str) -> Image:
    # The taggable-resource pattern also admits functions, layers, connectors...; only images live here.
    if _IMAGE_RESOURCE.fullmatch(resource) is None:
        raise NotFoundError(f"Resource not found: {resource}")
    image = load_image(tx, context, resource)
    if image.state is ImageState.DELETING:
        raise NotFoundError(f"Resource not found: {resource}")
    return image


@operation("TagResource")
def tag_resource(service: Service, context: RequestContext, params: Params) -> Result:
    def tag(tx: Tx) -> None:
        image = _image_for(tx, context, params["Resource"])
        tags = {**image.tags, **params["Tags"]}
        if len(tags) > MAX_TAGS:
            raise InvalidParameterValueError(
                f"A resource can have at most {MAX_TAGS} tags; this request would leave {len(tags)}.",
                Type="User",
            )
        tx.images.set_tags(image.arn, tags)

    service.transact(tag)
    return {}


@operation("UntagResource")
def untag_resource(service: Service, context: RequestContext, params: Params) -> Result:
    def untag(tx: Tx) -> None:
        image = _image_for(tx, context, params["Resource"])
        removed = set(params["TagKeys"])
        tx.images.set_tags(image.arn, {k: v for k, v in image.tags.items() if k not in removed})

    service.transact(untag)
    return {}


@operation("ListTags")
def list_tags(service: Service, context: RequestContext, params: Params) -> Result:
    image = service.read(lambda tx: _image_for(tx, context, params["Resource"]))
    return {"Tags": dict(image.tags)}
