"""CreateMicrovmAuthToken and CreateMicrovmShellAuthToken (spec §2.20–2.21, §5.4)."""

from __future__ import annotations

import uuid
from typing import Any

from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Result, Service, operation
from openmicrovm.service.errors import ConflictError, ValidationError
from openmicrovm.service.microvms import load_microvm
from openmicrovm.service.token_seal import TokenClaims
from openmicrovm.states import MicrovmState

AUTH_HEADER = "X-aws-proxy-auth"
MAX_EXPIRATION_MINUTES = 60
SHELL_PORT = 8022
# Ingress is an allow-list: the connectors that open each way into a MicroVM. NO_INGRESS, or a set
# without one of these, opens nothing (the endpoint checks every request, endpoint/backend.py).
HTTP_INGRESS_KINDS = frozenset({"HTTP_INGRESS", "ALL_INGRESS"})
SHELL_INGRESS_KINDS = frozenset({"SHELL_INGRESS", "ALL_INGRESS"})
ALL_PORTS = (1, 65535)


def _port_ranges(specifications: list[dict[str, Any]]) -> tuple[tuple[int, int], ...]:
    ranges = []
    for index, spec in enumerate(specifications):
        if "port" in spec:
            ranges.append((spec["port"], spec["port"]))
        elif "range" in spec:
            start, end = spec["range"]["startPort"], spec["range"]["endPort"]
            if start > end:
                raise ValidationError(
                    f"1 validation error detected: Value at 'allowedPorts.{index + 1}.member.range' failed to "
                    f"satisfy constraint: startPort ({start}) must be less than or equal to endPort ({end})"
                )
            ranges.append((start, end))
        else:
            ranges.append(ALL_PORTS)
    return tuple(ranges)


def _issue(
    service: Service, context: RequestContext, params: Params, kind: str, ports: tuple[tuple[int, int], ...]
) -> Result:
    minutes = params["expirationInMinutes"]
    if minutes > MAX_EXPIRATION_MINUTES:
        raise ValidationError(
            f"ExpirationMinutes {minutes} exceeded max allowed of {MAX_EXPIRATION_MINUTES}."
        )
    microvm = service.read(lambda tx: load_microvm(tx, context, params["microvmIdentifier"]))
    if microvm.state in (MicrovmState.TERMINATING, MicrovmState.TERMINATED):
        raise ConflictError(
            f"The MicroVM {microvm.id} is {microvm.state.wire}; tokens can only be created for live MicroVMs.",
            resourceId=microvm.id,
            resourceType="Microvm",
        )
    connectors = [arn.rsplit(":", 1)[-1] for arn in microvm.config["ingressNetworkConnectors"]]
    if kind == "shell" and not SHELL_INGRESS_KINDS & set(connectors):
        raise ValidationError(
            "Shell access requires SHELL_INGRESS network connector to be configured on the MicroVM."
        )
    if kind == "endpoint" and connectors == ["NO_INGRESS"]:
        raise ValidationError(
            f"The MicroVM {microvm.id} was run with NO_INGRESS and has no endpoint to authenticate to."
        )
    now = service.clock()
    claims = TokenClaims(
        account=context.account,
        microvm_id=microvm.id,
        ports=ports,
        kind=kind,
        issued_at=now,
        expires_at=now + minutes * service.settings.auth_token_minute_seconds,
        token_id=str(uuid.uuid4()),
    )
    return {"authToken": {AUTH_HEADER: service.keyring.seal(claims)}}


@operation("CreateMicrovmAuthToken")
def create_auth_token(service: Service, context: RequestContext, params: Params) -> Result:
    return _issue(service, context, params, "endpoint", _port_ranges(params["allowedPorts"]))


@operation("CreateMicrovmShellAuthToken")
def create_shell_auth_token(service: Service, context: RequestContext, params: Params) -> Result:
    return _issue(service, context, params, "shell", ((SHELL_PORT, SHELL_PORT),))
