"""The rest-json protocol: an HTTP request into operation parameters, a result into a response body,
a domain error into the AWS error form (X-Amzn-Errortype header, JSON body with `message`)."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

from botocore.model import ListShape, MapShape, OperationModel, Shape, StructureShape

from openmicrovm.api.model import error_shape
from openmicrovm.service.errors import ServiceError, ValidationError

JSON_CONTENT_TYPE = "application/json"


def _query_value(shape: Shape, values: list[str], name: str) -> Any:
    if isinstance(shape, ListShape):
        return values
    value = values[0]
    if shape.type_name in ("integer", "long"):
        try:
            return int(value)
        except ValueError:
            raise ValidationError(
                f"1 validation error detected: Value '{value}' at '{name}' failed to satisfy constraint: "
                "Member must be an integer"
            ) from None
    if shape.type_name == "boolean":
        return value.lower() == "true"
    return value


def parse_input(
    operation: OperationModel, labels: Mapping[str, str], raw_query: str, body: bytes
) -> dict[str, Any]:
    """Operation parameters, placed where the model puts them: URI labels, query string, JSON body."""
    shape = operation.input_shape
    params: dict[str, Any] = {}
    if shape is None:
        return params
    query = parse_qs(raw_query, keep_blank_values=True)
    body_members = {}
    for name, member in shape.members.items():
        location = member.serialization.get("location")
        wire_name = member.serialization.get("name", name)
        if location == "uri":
            if wire_name in labels:
                params[name] = labels[wire_name]
        elif location == "querystring":
            if wire_name in query:
                params[name] = _query_value(member, query[wire_name], name)
        elif location == "header":
            continue  # no input of this service is carried in a header
        else:
            body_members[name] = member
    if body.strip():
        if not body_members:
            # GET/DELETE operations ignore a body, as HTTP servers generally do.
            return params
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise ValidationError(f"The request body is not valid JSON: {error}") from None
        if not isinstance(document, dict):
            raise ValidationError("The request body must be a JSON object.")
        for key, value in document.items():
            if key in params:
                raise ValidationError(f"'{key}' belongs in the request URI or query string, not in the body.")
            params[key] = value
    return params


Converter = Callable[[Any], Any]


def _timestamp(value: Any) -> Any:
    # rest-json timestamps are epoch seconds; keep millisecond precision like AWS.
    return math.floor(float(value) * 1000) / 1000


@functools.cache
def _converter(shape: Shape) -> Converter | None:
    """How to turn a result value of this shape into JSON-ready data; None when it already is
    (only timestamps need converting), which keeps serialising lists of summaries cheap."""
    if shape.type_name == "timestamp":
        return _timestamp
    if isinstance(shape, StructureShape):
        members = {name: _converter(member) for name, member in shape.members.items()}
        active = {name: convert for name, convert in members.items() if convert is not None}
        if not active:
            return None

        def structure(value: dict[str, Any]) -> dict[str, Any]:
            converted = dict(value)
            for name, convert in active.items():
                item = converted.get(name)
                if item is not None:
                    converted[name] = convert(item)
            return converted

        return structure
    if isinstance(shape, ListShape):
        convert_member = _converter(shape.member)
        if convert_member is None:
            return None
        return lambda value: [None if item is None else convert_member(item) for item in value]
    if isinstance(shape, MapShape):
        convert_value = _converter(shape.value)
        if convert_value is None:
            return None
        return lambda value: {k: None if v is None else convert_value(v) for k, v in value.items()}
    return None


def serialize_output(operation: OperationModel, result: Mapping[str, Any]) -> bytes | None:
    shape = operation.output_shape
    if shape is None:
        return None
    # Unset members are sent as explicit nulls, as the live service does.
    document = {
        name: None for name in shape.members if shape.members[name].serialization.get("location") is None
    }
    document.update(result)
    convert = _converter(shape)
    return json.dumps(convert(document) if convert else document, separators=(",", ":")).encode()


# Errors that are not in the model but that AWS front doors answer with.
UNMODELED_STATUS = {
    "UnknownOperationException": 404,
    "RequestEntityTooLargeException": 413,
    "MissingAuthenticationTokenException": 403,
    "UnrecognizedClientException": 403,
    "InvalidSignatureException": 403,
    "IncompleteSignatureException": 403,
}


def error_response(
    code: str, message: str, members: Mapping[str, Any] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for an AWS error."""
    shape = error_shape(code)
    body: dict[str, Any] = {"message": message}
    headers = {"X-Amzn-Errortype": code, "Content-Type": JSON_CONTENT_TYPE}
    if isinstance(shape, StructureShape):
        status = int(shape.metadata.get("error", {}).get("httpStatusCode", 400))
        for name, member in shape.members.items():
            value = (members or {}).get(name)
            if member.serialization.get("location") == "header":
                if value is not None:
                    headers[member.serialization["name"]] = str(value)
                continue
            if name != "message":
                body[name] = value
    else:
        status = UNMODELED_STATUS.get(code, 400)
    return status, headers, json.dumps(body).encode()


def service_error_response(error: ServiceError) -> tuple[int, dict[str, str], bytes]:
    return error_response(error.code, error.message, error.members)
