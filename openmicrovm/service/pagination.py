"""Opaque, tamper-proof nextTokens: a signed position bound to the operation, caller and filters."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Service
from openmicrovm.service.errors import ValidationError

DEFAULT_PAGE_SIZE = 50
INVALID = "Invalid nextToken: it is malformed, or was issued for another request, caller or filter."


def _scope(context: RequestContext, operation: str, filters: dict[str, Any]) -> str:
    return json.dumps([operation, context.account, context.region, filters], sort_keys=True)


def _sign(service: Service, payload: bytes) -> bytes:
    return hmac.new(service.secret, payload, hashlib.sha256).digest()[:16]


def encode_token(
    service: Service, context: RequestContext, operation: str, filters: dict[str, Any], position: list[Any]
) -> str:
    payload = json.dumps({"s": _scope(context, operation, filters), "p": position}).encode()
    return base64.urlsafe_b64encode(_sign(service, payload) + payload).decode().rstrip("=")


def decode_token(
    service: Service, context: RequestContext, operation: str, filters: dict[str, Any], token: str | None
) -> list[Any] | None:
    """The position after which the next page starts, or None for the first page."""
    if token is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        signature, payload = raw[:16], raw[16:]
        if not hmac.compare_digest(signature, _sign(service, payload)):
            raise ValueError("bad signature")
        decoded = json.loads(payload)
        if decoded["s"] != _scope(context, operation, filters) or not isinstance(decoded["p"], list):
            raise ValueError("other scope")
        return decoded["p"]
    except (ValueError, KeyError, TypeError):
        raise ValidationError(INVALID) from None


def page_size(params: Params) -> int:
    return int(params.get("maxResults") or DEFAULT_PAGE_SIZE)


def paginate(
    service: Service,
    context: RequestContext,
    operation: str,
    params: Params,
    filters: dict[str, Any],
    fetch: Any,
    position_of: Any,
) -> tuple[list[Any], str | None]:
    """fetch(after_position | None, limit) returns rows in order; position_of(row) gives the row's
    sort key as a JSON list. Returns (rows of this page, nextToken or None)."""
    after = decode_token(service, context, operation, filters, params.get("nextToken"))
    limit = page_size(params)
    rows = fetch(after, limit + 1)
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    return page, encode_token(service, context, operation, filters, position_of(page[-1]))
