"""Command-line flags that become parts of API requests (`logging`, `environmentVariables`, ...)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from openmicrovm.cli.connection import CliError


def read_text_argument(value: str, what: str) -> str:
    """`@path` reads a file, `@-` standard input; anything else is the value itself."""
    if not value.startswith("@"):
        return value
    source = value[1:]
    try:
        return sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as error:
        raise CliError(f"cannot read {what} from {source}: {error.strerror}", 2) from None


def json_argument(value: str, what: str) -> Any:
    text = read_text_argument(value, what)
    try:
        return json.loads(text)
    except ValueError as error:
        raise CliError(f"{what} is not valid JSON: {error}", 2) from None


def logging_config(value: str | None) -> dict[str, Any] | None:
    """`disabled`, `cloudwatch`, `cloudwatch:GROUP` or `cloudwatch:GROUP:STREAM` (spec §6.5)."""
    if value is None:
        return None
    if value == "disabled":
        return {"disabled": {}}
    kind, _, rest = value.partition(":")
    if kind.lower() != "cloudwatch":
        raise CliError(f"--logging must be disabled or cloudwatch[:GROUP[:STREAM]], not {value!r}", 2)
    group, _, stream = rest.partition(":")
    target: dict[str, str] = {}
    if group:
        target["logGroup"] = group
    if stream:
        target["logStream"] = stream
    return {"cloudWatch": target}


def environment(pairs: list[str] | None) -> dict[str, str] | None:
    if pairs is None:
        return None
    variables = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise CliError(f"--env takes NAME=VALUE, not {pair!r}", 2)
        variables[name] = value
    return variables


def version_label(value: str | None) -> str | None:
    """Versions are "N.0" on the wire; "N" is accepted for short."""
    if value is None or "." in value:
        return value
    return f"{value}.0"
