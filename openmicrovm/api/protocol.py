"""The rest-json protocol: an HTTP request into operation parameters, a result into a response body,
a domain error into the AWS error form (X-Amzn-Errortype header, JSON body with `message`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson
from botocore.model import ListShape, OperationModel, Shape, StructureShape

from openmicrovm.service.errors import ServiceError, ValidationError
from openmicrovm.wire_model import error_shape

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


@dataclass(frozen=True)
class _InputPlan:
    """Where an operation's input members are on the wire, read once from the model."""

    # (member, in the URI (else the query string), label or query key, shape), in the model's order
    located: tuple[tuple[str, bool, str, Shape], ...]
    has_query: bool
    has_body: bool  # whether any member is carried in the JSON body


@functools.cache
def _input_plan(operation: OperationModel) -> _InputPlan | None:
    shape = operation.input_shape
    if shape is None:
        return None
    located = []
    has_body = False
    for name, member in shape.members.items():
        location = member.serialization.get("location")
        wire_name = member.serialization.get("name", name)
        if location in ("uri", "querystring"):
            located.append((name, location == "uri", wire_name, member))
        elif location == "header":
            continue  # no input of this service is carried in a header
        else:
            has_body = True
    has_query = any(not in_uri for _, in_uri, _, _ in located)
    return _InputPlan(tuple(located), has_query, has_body)


def parse_input(
    operation: OperationModel, labels: Mapping[str, str], raw_query: str, body: bytes
) -> dict[str, Any]:
    """Operation parameters, placed where the model puts them: URI labels, query string, JSON body."""
    plan = _input_plan(operation)
    params: dict[str, Any] = {}
    if plan is None:
        return params
    query = parse_qs(raw_query, keep_blank_values=True) if plan.has_query and raw_query else {}
    for name, in_uri, key, member in plan.located:
        if in_uri:
            if key in labels:
                params[name] = labels[key]
        elif key in query:
            params[name] = _query_value(member, query[key], name)
    if body.strip():
        if not plan.has_body:
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


@functools.cache
def _output_members(operation: OperationModel) -> tuple[str, ...] | None:
    """The members of an operation's response body (None: the operation answers without one)."""
    shape = operation.output_shape
    if shape is None:
        return None
    return tuple(
        name for name, member in shape.members.items() if member.serialization.get("location") is None
    )


def serialize_output(operation: OperationModel, result: Mapping[str, Any]) -> bytes | None:
    members = _output_members(operation)
    if members is None:
        return None
    # Unset members are sent as explicit nulls, as the live service does.
    document: dict[str, Any] = dict.fromkeys(members)
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
    code: str, message: str, members: Mapping[str, Any] | None = None, status: int | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for an AWS error; `status` overrides the model's."""
    shape = error_shape(code)
    body: dict[str, Any] = {"message": message}
    headers = {"X-Amzn-Errortype": code, "Content-Type": JSON_CONTENT_TYPE}
    if isinstance(shape, StructureShape):
        status = status or int(shape.metadata.get("error", {}).get("httpStatusCode", 400))
        for name, member in shape.members.items():
            value = (members or {}).get(name)
            if member.serialization.get("location") == "header":
                if value is not None:
                    headers[member.serialization["name"]] = str(value)
                continue
            if name != "message":
                body[name] = value
    else:
        status = status or UNMODELED_STATUS.get(code, 400)
    return status, headers, json.dumps(body).encode()


# A database outage: 503, which SDKs retry, with the model's ServiceException.
UNAVAILABLE_CODE = "ServiceException"
UNAVAILABLE_STATUS = 503
UNAVAILABLE_MESSAGE = "The service's database is unavailable right now; try the request again shortly."


def service_error_response(error: ServiceError) -> tuple[int, dict[str, str], bytes]:
    return error_response(error.code, error.message, error.members)
