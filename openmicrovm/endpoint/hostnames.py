"""The hostnames MicroVM endpoints answer to: `<uuid>.lambda-microvm.<region>.localhost[:port]`."""

from __future__ import annotations

import re

ENDPOINT_HOST = re.compile(
    r"(?P<host>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.lambda-microvm\.[a-z0-9-]+\.localhost)"
    r"\.?(?::[0-9]{1,5})?",
    re.IGNORECASE,
)


def endpoint_hostname(host_header: str | None) -> str | None:
    """The endpoint hostname a Host header names, or None for anything else (the API)."""
    if not host_header:
        return None
    match = ENDPOINT_HOST.fullmatch(host_header.strip())
    return match["host"].lower() if match else None
