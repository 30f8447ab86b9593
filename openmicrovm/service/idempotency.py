"""clientToken idempotency (spec §2): a replay with the same parameters gets the original response
verbatim; the same token with other parameters is a ValidationException."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Result, Service
from openmicrovm.service.errors import ValidationError
from openmicrovm.store import Tx

MISMATCH = "The provided clientToken was used with different request parameters."


def _fingerprint(params: Params) -> str:
    significant = {key: value for key, value in params.items() if key != "clientToken"}
    canonical = json.dumps(significant, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def idempotent(
    service: Service,
    context: RequestContext,
    operation: str,
    params: Params,
    perform: Callable[[Tx], Result],
) -> Result:
    """Run `perform` once per clientToken; its result is stored in the same transaction as its
    effects, so two calls racing with one token get one effect and the same answer."""
    token = params.get("clientToken")
    if token is None:
        return service.transact(perform)
    fingerprint = _fingerprint(params)

    def once(tx: Tx) -> Result:
        tx.client_tokens.forget_before(service.clock() - service.settings.client_token_ttl_seconds)
        used = tx.client_tokens.find(context.account, context.region, operation, token)
        if used is not None:
            if used.fingerprint != fingerprint:
                raise ValidationError(MISMATCH)
            return used.response
        result = perform(tx)
        tx.client_tokens.remember(
            context.account, context.region, operation, token, fingerprint, result, service.clock()
        )
        return result

    return service.transact(once)
