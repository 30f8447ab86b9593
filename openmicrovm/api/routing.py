"""Routes from the model: every operation's method + requestUri template."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import unquote

from botocore.model import OperationModel

from openmicrovm.wire_model import operations

# The same few labels (the ARNs a client works on) come back request after request, and unquote
# takes microseconds on an ARN's escaped colons. A pure function, so a cache is safe; bounded in
# entries and in their length (the model's identifiers are at most 256 characters), so that
# requests of long or ever-new paths cannot make it large.
_CACHED_LABEL_LENGTH = 512
_cached_unquote = functools.lru_cache(maxsize=4096)(unquote)


def _unquote(label: str) -> str:
    return _cached_unquote(label) if len(label) <= _CACHED_LABEL_LENGTH else unquote(label)


@dataclass(frozen=True)
class Route:
    operation: OperationModel
    pattern: re.Pattern[str]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Match:
    operation: OperationModel
    labels: dict[str, str]


class Router:
    def __init__(self) -> None:
        self._routes: dict[str, list[Route]] = {}
        for operation in operations():
            method = operation.http["method"]
            template = operation.http["requestUri"].split("?", 1)[0]
            labels = tuple(re.findall(r"{([^}+]+)\+?}", template))
            # A label is one raw path segment; greedy labels ({x+}) may span several.
            regex_text = re.sub(
                r"{([^}]+)}",
                lambda m: "(.+)" if m.group(1).endswith("+") else "([^/]*)",
                re.escape(template).replace(r"\{", "{").replace(r"\}", "}"),
            )
            self._routes.setdefault(method, []).append(Route(operation, re.compile(regex_text), labels))
        # Longer, more specific templates first, so /a/{x}/b wins over /a/{x}.
        for routes in self._routes.values():
            routes.sort(key=lambda r: (-r.pattern.pattern.count("/"), -len(r.pattern.pattern)))

    def match(self, method: str, raw_path: str) -> Match | None:
        for route in self._routes.get(method, ()):
            found = route.pattern.fullmatch(raw_path)
            if found:
                # Decode each label on its own, so an encoded "/" inside an ARN stays inside it.
                return Match(
                    route.operation,
                    {name: _unquote(v) for name, v in zip(route.labels, found.groups(), strict=True)},
                )
        return None

    def allows(self, raw_path: str) -> list[str]:
        """The methods that would accept this path (for a clearer unknown-operation message)."""
        return sorted(
            m for m, routes in self._routes.items() if any(r.pattern.fullmatch(raw_path) for r in routes)
        )
