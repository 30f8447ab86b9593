from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestContext:
    """Who is asking and where: every resource is scoped to one account and one region."""

    account: str
    region: str
    request_id: str = ""
