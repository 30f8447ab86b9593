"""Input validation against the model's shapes, with AWS's own message format:

    2 validation errors detected: Value null at 'name' failed to satisfy constraint: Member must not
    be null; Value 'x y' at 'hooks.port' failed to satisfy constraint: ...

Lists are addressed as `field.<n>.member` (1-based) and map entries as the map itself, as AWS does.
Patterns in the model are Java regular expressions that must match the whole value.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import regex
from botocore.model import ListShape, MapShape, Shape, StructureShape

from openmicrovm.service.errors import ValidationError

_JSON_TYPES = {
    "string": (str,),
    "integer": (int,),
    "long": (int,),
    "boolean": (bool,),
    "double": (int, float),
    "float": (int, float),
    "structure": (dict,),
    "list": (list,),
    "map": (dict,),
}
_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "long": "an integer",
    "boolean": "a boolean",
    "double": "a number",
    "float": "a number",
    "structure": "an object",
    "list": "a list",
    "map": "an object (map)",
}


@functools.cache
def _pattern(expression: str) -> Any:
    return regex.compile(expression)


def _shown(shape: Shape, value: Any) -> str:
    """How a value appears in a message: never for sensitive members, as AWS."""
    if shape.metadata.get("sensitive"):
        return "Value"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return f"Value '{text}'"


class Validator:
    """Collects every violation of one input, then raises them together."""

    def __init__(self, minimum_overrides: Mapping[str, int] | None = None) -> None:
        # Shape name → a lower bound that replaces the model's (test-only knobs such as idle minimums).
        self.minimum_overrides = dict(minimum_overrides or {})

    def check(self, shape: StructureShape, value: dict[str, Any]) -> None:
        errors: list[str] = []
        self._structure(shape, value, "", errors)
        if errors:
            noun = "error" if len(errors) == 1 else "errors"
            raise ValidationError(f"{len(errors)} validation {noun} detected: " + "; ".join(errors))

    def _violation(self, errors: list[str], shape: Shape, value: Any, path: str, rule: str) -> None:
        errors.append(f"{_shown(shape, value)} at '{path}' failed to satisfy constraint: {rule}")

    def _value(self, shape: Shape, value: Any, path: str, errors: list[str]) -> None:
        kinds = _JSON_TYPES.get(shape.type_name)
        if kinds is not None and (
            not isinstance(value, kinds) or (shape.type_name != "boolean" and isinstance(value, bool))
        ):
            self._violation(errors, shape, value, path, f"Member must be {_TYPE_WORDS[shape.type_name]}")
            return
        if isinstance(shape, StructureShape):
            self._structure(shape, value, path, errors)
        elif isinstance(shape, ListShape):
            self._length(shape, value, path, errors)
            for index, item in enumerate(value, start=1):
                if item is None:
                    self._violation(
                        errors, shape.member, item, f"{path}.{index}.member", "Member must not be null"
                    )
                else:
                    self._value(shape.member, item, f"{path}.{index}.member", errors)
        elif isinstance(shape, MapShape):
            self._map(shape, value, path, errors)
        elif shape.type_name == "string":
            self._string(shape, value, path, errors)
        elif shape.type_name in ("integer", "long", "double", "float"):
            self._number(shape, value, path, errors)

    def _structure(self, shape: StructureShape, value: dict[str, Any], path: str, errors: list[str]) -> None:
        prefix = f"{path}." if path else ""
        for name in value:
            if name not in shape.members:
                errors.append(
                    f"Value at '{prefix}{name}' failed to satisfy constraint: "
                    f"Member is not a member of {shape.name}; known members: {', '.join(shape.members)}"
                )
        if shape.metadata.get("union"):
            present = [name for name in shape.members if value.get(name) is not None]
            if len(present) != 1:
                errors.append(
                    f"Value at '{path}' failed to satisfy constraint: Member must have exactly one of "
                    f"[{', '.join(shape.members)}] set (a union), found {len(present)}"
                )
        for name, member in shape.members.items():
            member_value = value.get(name)
            if member_value is None:
                if name in shape.required_members:
                    errors.append(
                        f"Value null at '{prefix}{name}' failed to satisfy constraint: Member must not be null"
                    )
                continue
            self._value(member, member_value, f"{prefix}{name}", errors)

    def _length(self, shape: Shape, value: Any, path: str, errors: list[str]) -> None:
        low, high = shape.metadata.get("min"), shape.metadata.get("max")
        if high is not None and len(value) > high:
            self._violation(
                errors, shape, value, path, f"Member must have length less than or equal to {high}"
            )
        if low is not None and len(value) < low:
            self._violation(
                errors, shape, value, path, f"Member must have length greater than or equal to {low}"
            )

    def _string(self, shape: Shape, value: str, path: str, errors: list[str]) -> None:
        for rule in self._string_rules(shape, value):
            self._violation(errors, shape, value, path, rule)

    def _string_rules(self, shape: Shape, value: str) -> list[str]:
        rules = []
        enum = shape.enum if hasattr(shape, "enum") else []
        if enum and value not in enum:
            rules.append(f"Member must satisfy enum value set: [{', '.join(enum)}]")
        low, high = shape.metadata.get("min"), shape.metadata.get("max")
        if high is not None and len(value) > high:
            rules.append(f"Member must have length less than or equal to {high}")
        if low is not None and len(value) < low:
            rules.append(f"Member must have length greater than or equal to {low}")
        pattern = shape.metadata.get("pattern")
        if pattern and _pattern(pattern).fullmatch(value) is None:
            rules.append(f"Member must satisfy regular expression pattern: {pattern}")
        return rules

    def _number(self, shape: Shape, value: float, path: str, errors: list[str]) -> None:
        low = self.minimum_overrides.get(shape.name, shape.metadata.get("min"))
        high = shape.metadata.get("max")
        if high is not None and value > high:
            self._violation(
                errors, shape, value, path, f"Member must have value less than or equal to {high}"
            )
        if low is not None and value < low:
            self._violation(
                errors, shape, value, path, f"Member must have value greater than or equal to {low}"
            )

    def _map(self, shape: MapShape, value: dict[str, Any], path: str, errors: list[str]) -> None:
        self._length(shape, value, path, errors)
        key_rules: list[str] = []
        value_rules: list[str] = []
        for key, item in value.items():
            key_rules += [r for r in self._string_rules(shape.key, key) if r not in key_rules]
            if item is None:
                rules = ["Member must not be null"]
            elif not isinstance(item, _JSON_TYPES.get(shape.value.type_name, (object,))) or isinstance(
                item, bool
            ):
                rules = [f"Member must be {_TYPE_WORDS.get(shape.value.type_name, 'valid')}"]
            elif shape.value.type_name == "string":
                rules = self._string_rules(shape.value, item)
            else:
                nested: list[str] = []
                self._value(shape.value, item, f"{path}.{key}", nested)
                errors.extend(nested)
                rules = []
            value_rules += [r for r in rules if r not in value_rules]
        if key_rules:
            self._violation(
                errors, shape, value, path, f"Map keys must satisfy constraint: [{', '.join(key_rules)}]"
            )
        if value_rules:
            self._violation(
                errors,
                shape.value if shape.value.metadata.get("sensitive") else shape,
                value,
                path,
                f"Map value must satisfy constraint: [{', '.join(value_rules)}]",
            )
