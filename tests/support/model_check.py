"""Checks a raw JSON response body against the botocore model: every response a test sees goes
through here (see conftest.py), so the server can never drift from the wire model unnoticed."""

from __future__ import annotations

from typing import Any

import regex
from botocore.model import ListShape, MapShape, Shape, StructureShape

from openmicrovm.wire_model import service_model

# Members the live service returns although the model does not list them (spec §1.2, §2, §12.5).
UNDOCUMENTED_MEMBERS = {"id", "buildPhaseOverrides", "roleConfiguration", "terminationReasonCode"}


# Members whose model pattern ([^\s]+) the live service itself does not keep: stateReason is
# free text such as "Success." or "Suspend lifecycle hook returned HTTP status 500. Please ..."
# (spec appendix B).
FREE_TEXT_MEMBERS = {"stateReason"}

# Errors every AWS front door may answer before an operation runs (authentication, size).
COMMON_ERRORS = {
    "MissingAuthenticationTokenException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "IncompleteSignatureException",
    "RequestEntityTooLargeException",
    # Any operation while the database is away: 503, retried by SDKs (the model's shape, which it
    # lists for the tagging operations only).
    "ServiceException",
}


class ModelMismatch(AssertionError):
    pass


def _check(shape: Shape, value: Any, path: str, problems: list[str], free_text: bool) -> None:
    if value is None:
        return
    kind = shape.type_name
    if isinstance(shape, StructureShape):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object, got {value!r}")
            return
        for name in value:
            if name not in shape.members and name not in UNDOCUMENTED_MEMBERS:
                problems.append(f"{path}.{name}: not a member of {shape.name}")
        for name in shape.required_members:
            member = shape.members[name]
            if member.serialization.get("location") == "header":
                continue
            if value.get(name) is None:
                problems.append(f"{path}.{name}: required member missing or null")
        if shape.metadata.get("union"):
            present = [n for n in shape.members if value.get(n) is not None]
            if len(present) != 1:
                problems.append(f"{path}: union with {len(present)} members set")
        for name, member in shape.members.items():
            _check(member, value.get(name), f"{path}.{name}", problems, name in FREE_TEXT_MEMBERS)
    elif isinstance(shape, ListShape):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return
        _length(shape, value, path, problems)
        for index, item in enumerate(value):
            _check(shape.member, item, f"{path}[{index}]", problems, False)
    elif isinstance(shape, MapShape):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a map, got {value!r}")
            return
        _length(shape, value, path, problems)
        for key, item in value.items():
            _check(shape.key, key, f"{path} key", problems, False)
            _check(shape.value, item, f"{path}[{key}]", problems, False)
    elif kind == "string":
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}")
            return
        _length(shape, value, path, problems)
        if shape.enum and value not in shape.enum:
            problems.append(f"{path}: {value!r} not in enum {shape.enum}")
        pattern = shape.metadata.get("pattern")
        if pattern and not free_text and regex.fullmatch(pattern, value) is None:
            problems.append(f"{path}: {value!r} does not match {pattern}")
    elif kind in ("integer", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{path}: expected an integer, got {value!r}")
            return
        low, high = shape.metadata.get("min"), shape.metadata.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            problems.append(f"{path}: {value} outside [{low}, {high}]")
    elif kind == "boolean":
        if not isinstance(value, bool):
            problems.append(f"{path}: expected a boolean, got {value!r}")
    elif kind == "timestamp":
        if not isinstance(value, int | float) or isinstance(value, bool):
            problems.append(f"{path}: expected epoch seconds, got {value!r}")


def _length(shape: Shape, value: Any, path: str, problems: list[str]) -> None:
    low, high = shape.metadata.get("min"), shape.metadata.get("max")
    if low is not None and len(value) < low:
        problems.append(f"{path}: length {len(value)} < {low}")
    if high is not None and len(value) > high:
        problems.append(f"{path}: length {len(value)} > {high}")


def check_output(operation_name: str, document: Any) -> None:
    shape = service_model().operation_model(operation_name).output_shape
    problems: list[str] = []
    if shape is None:
        if document not in (None, b"", {}):
            problems.append(f"{operation_name} has no output, got {document!r}")
    else:
        _check(shape, document, operation_name, problems, False)
    if problems:
        raise ModelMismatch("; ".join(problems))


def check_error(operation_name: str, code: str, document: Any) -> None:
    operation = service_model().operation_model(operation_name)
    modeled = {shape.name: shape for shape in operation.error_shapes}
    problems: list[str] = []
    if code in COMMON_ERRORS:
        pass
    elif code not in modeled:
        problems.append(f"{operation_name} answered {code}, which its model does not list")
    else:
        _check(modeled[code], document, code, problems, False)
    if not isinstance(document, dict) or not isinstance(document.get("message"), str):
        problems.append(f"{code}: body has no message: {document!r}")
    if problems:
        raise ModelMismatch("; ".join(problems))
