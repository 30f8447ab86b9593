"""Tags on MicroVM images through the classic Lambda tagging API (spec §2.22–2.24)."""

from __future__ import annotations

import json
import re

from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Result, Service, operation
from openmicrovm.service.errors import InvalidParameterValueError, NotFoundError
from openmicrovm.service.records import load_image
from openmicrovm.store.db import Row

MAX_TAGS = 50  # Lambda's limit of tags per resource
_IMAGE_RESOURCE = re.compile(r"arn:[^:]+:lambda:[^:]+:[^:]+:microvm-image:.+")


def _image_for(service: Service, context: RequestContext, resource: str) -> Row:
    # The taggable-resource pattern also admits functions, layers, connectors...; only images live here.
    if _IMAGE_RESOURCE.fullmatch(resource) is None:
        raise NotFoundError(f"Resource not found: {resource}")
    image = load_image(service, context, resource)
    if image["state"] == "DELETING":
        raise NotFoundError(f"Resource not found: {resource}")
    return image


def _save(service: Service, image: Row, tags: dict[str, str]) -> None:
    service.db.execute("UPDATE images SET tags = ? WHERE arn = ?", (json.dumps(tags), image["arn"]))


@operation("TagResource")
def tag_resource(service: Service, context: RequestContext, params: Params) -> Result:
    with service.transaction():
        image = _image_for(service, context, params["Resource"])
        tags = {**json.loads(image["tags"]), **params["Tags"]}
        if len(tags) > MAX_TAGS:
            raise InvalidParameterValueError(
                f"A resource can have at most {MAX_TAGS} tags; this request would leave {len(tags)}.",
                Type="User",
            )
        _save(service, image, tags)
    return {}


@operation("UntagResource")
def untag_resource(service: Service, context: RequestContext, params: Params) -> Result:
    with service.transaction():
        image = _image_for(service, context, params["Resource"])
        tags = {k: v for k, v in json.loads(image["tags"]).items() if k not in set(params["TagKeys"])}
        _save(service, image, tags)
    return {}


@operation("ListTags")
def list_tags(service: Service, context: RequestContext, params: Params) -> Result:
    image = _image_for(service, context, params["Resource"])
    return {"Tags": json.loads(image["tags"])}
