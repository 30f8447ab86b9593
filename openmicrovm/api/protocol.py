"""The rest-json protocol: an HTTP request into operation parameters, a result into a response body,
a domain error into the AWS error form (X-Amzn-Errortype header, JSON body with `message`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

import orjson
from botocore.model import ListShape, OperationModel, Shape, StructureShape

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
        except RecursionError:
            raise ValidationError("The request body is not valid JSON: it is nested too deeply.") from None
        if not isinstance(document, dict):
            raise ValidationError("The request body must be a JSON object.")
        for key, value in document.items():
            if key in params:
                raise ValidationError(f"'{key}' belongs in the request URI or query string, not in the body.")
            params[key] = value
    return params


def serialize_output(operation: OperationModel, result: Mapping[str, Any]) -> bytes | None:
    shape = operation.output_shape
    if shape is None:
        return None
    # Unset members are sent as explicit nulls, as the live service does.
    document = {
        name: None for name in shape.members if shape.members[name].serialization.get("location") is None
    }
    document.update(result)
    # Timestamps are stored as epoch seconds to the millisecond (Service.clock), the rest-json form.
    return orjson.dumps(document)


# Errors that are not in the model but that AWS front doors answer with.
UNMODELED_STATUS = {
    "UnknownOperationException": 404,
    # A Host that does not name this server (api/hosts.py): HTTP's "not meant for me".
    "MisdirectedRequestException": 421,
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
