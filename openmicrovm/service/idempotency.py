"""clientToken idempotency (spec §2): a replay with the same parameters gets the original response
verbatim; the same token with other parameters is a ValidationException."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Result, Service
from openmicrovm.service.errors import ValidationError

MISMATCH = "The provided clientToken was used with different request parameters."


def _fingerprint(params: Params) -> str:
    significant = {key: value for key, value in params.items() if key != "clientToken"}
    canonical = json.dumps(significant, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def idempotent(
    service: Service, context: RequestContext, operation: str, params: Params, perform: Callable[[], Result]
) -> Result:
    """Run `perform` once per clientToken; its result is stored in the same transaction as its effects."""
    token = params.get("clientToken")
    if token is None:
        with service.transaction():
            return perform()
    fingerprint = _fingerprint(params)
    oldest = service.clock() - service.settings.client_token_ttl_seconds
    with service.transaction() as db:
        db.execute("DELETE FROM client_tokens WHERE created_at < ?", (oldest,))
        row = db.one(
            "SELECT fingerprint, response FROM client_tokens "
            "WHERE account = ? AND region = ? AND operation = ? AND token = ?",
            (context.account, context.region, operation, token),
        )
        if row is not None:
            if row["fingerprint"] != fingerprint:
                raise ValidationError(MISMATCH)
            return json.loads(row["response"])
        result = perform()
        db.execute(
            "INSERT INTO client_tokens (account, region, operation, token, fingerprint, response, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                context.account,
                context.region,
                operation,
                token,
                fingerprint,
                json.dumps(result),
                service.clock(),
            ),
        )
        return result
