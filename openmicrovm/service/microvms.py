"""MicroVMs: run, read, list, suspend, resume, terminate (spec §2.14–2.19, §3.4, §5.1), and the
state changes the lifecycle engine and the timers ask for."""

from __future__ import annotations

import uuid
from typing import Any

from openmicrovm.service.arns import (
    INGRESS_CONNECTORS,
    managed_connector_arn,
    parse_connector,
    parse_image_arn,
)
from openmicrovm.service.context import RequestContext
from openmicrovm.service.core import Params, Result, Service, operation
from openmicrovm.service.errors import (
    AccessDeniedError,
    ConflictError,
    NotFoundError,
    QuotaExceededError,
    ValidationError,
)
from openmicrovm.service.idempotency import idempotent
from openmicrovm.service.image_config import hook_enabled, memory_mib
from openmicrovm.service.pagination import paginate
from openmicrovm.service.views import image_not_found, version_number
from openmicrovm.states import ImageState, MicrovmState
from openmicrovm.store import Tx
from openmicrovm.store.records import Microvm, Version
from openmicrovm.store.repositories.moves import KEEP

DEFAULT_MAXIMUM_DURATION = 28800
MAX_IDLE_SECONDS = 28800
RUN_CONFIG_MEMBERS = (
    "executionRoleArn",
    "idlePolicy",
    "kmsKeyIdentifier",
    "ingressNetworkConnectors",
    "egressNetworkConnectors",
    "maximumDurationInSeconds",
    "logging",
)
SUCCESS = "Success."


def microvm_not_found(microvm_id: str) -> str:
    return f"MicroVM not found: {microvm_id}"


def terminated_message(microvm_id: str) -> str:
    return f"The MicroVM {microvm_id} has been terminated and its state cannot be changed."


def load_microvm(tx: Tx, context: RequestContext, microvm_id: str) -> Microvm:
    """MicroVMs have no ARN: another account's id is simply not found."""
    microvm = tx.microvms.owned(microvm_id, context.account, context.region)
    if microvm is None:
        raise NotFoundError(microvm_not_found(microvm_id), resourceId=microvm_id, resourceType="Microvm")
    return microvm


def microvm_detail(microvm: Microvm) -> dict[str, Any]:
    detail = {key: microvm.config.get(key) for key in RUN_CONFIG_MEMBERS if key not in ("logging",)}
    detail.update(
        {
            "endpoint": microvm.endpoint,
            "imageArn": microvm.image_arn,
            "imageVersion": microvm.image_version,
            "microvmId": microvm.id,
            "startedAt": microvm.started_at,
            "state": microvm.state.wire,
            "stateReason": microvm.state_reason,
            "terminatedAt": microvm.terminated_at,
            "terminationReasonCode": None,  # undocumented, always null live
        }
    )
    return detail


def _connectors(context: RequestContext, values: list[str] | None, direction: str) -> list[str]:
    field = f"{direction}NetworkConnectors"
    if values is None:
        default = "HTTP_INGRESS" if direction == "ingress" else "INTERNET_EGRESS"
        return [managed_connector_arn(context.region, default)]
    kinds = []
    for index, value in enumerate(values):
        connector = parse_connector(context, value, f"{field}.{index + 1}.member")
        is_ingress = connector.kind in INGRESS_CONNECTORS
        if is_ingress != (direction == "ingress"):
            raise ValidationError(f"Network connector {value} cannot be used in {field}.")
        kinds.append(connector.kind)
    if "NO_INGRESS" in kinds and len(kinds) > 1:
        raise ValidationError("NO_INGRESS cannot be combined with other ingress network connectors.")
    return values


def _check_idle_policy(service: Service, policy: dict[str, Any] | None) -> None:
    if policy is None:
        return
    idle = policy["maxIdleDurationSeconds"]
    if idle > MAX_IDLE_SECONDS:
        raise ValidationError(
            f"1 validation error detected: Value '{idle}' at 'idlePolicy.maxIdleDurationSeconds' failed to "
            f"satisfy constraint: Member must have value less than or equal to {MAX_IDLE_SECONDS}"
        )


def _resolve_version(tx: Tx, context: RequestContext, identifier: str, label: str | None) -> Version:
    """The version to run: the one asked for, or the newest SUCCESSFUL and ACTIVE one."""
    if not identifier.startswith("arn:"):
        raise ValidationError("Malformed ARN - doesn't start with 'arn:'")
    arn = parse_image_arn(identifier)
    no_active = f"No active version found for MicroVM image {identifier}"
    if arn.account != context.account and arn.account != "aws":
        raise AccessDeniedError(
            f"User is not authorized to run MicroVM image {identifier}: it belongs to another account."
        )
    image = tx.images.get(str(arn))
    if image is None or arn.region != context.region or image.state is ImageState.DELETING:
        raise NotFoundError(no_active)
    if label is None:
        version = tx.versions.runnable(image.arn, None)
    else:
        number = version_number(label)
        version = None if number is None else tx.versions.runnable(image.arn, number)
        no_active = f"No active version found for MicroVM image {identifier}, Version: {label}"
    if version is None:
        raise NotFoundError(no_active)
    return version


@operation("RunMicrovm")
def run_microvm(service: Service, context: RequestContext, params: Params) -> Result:
    _check_idle_policy(service, params.get("idlePolicy"))
    ingress = _connectors(context, params.get("ingressNetworkConnectors"), "ingress")
    egress = _connectors(context, params.get("egressNetworkConnectors"), "egress")

    def perform(tx: Tx) -> Result:
        version = _resolve_version(tx, context, params["imageIdentifier"], params.get("imageVersion"))
        payload = params.get("runHookPayload")
        if payload and not hook_enabled(version.config, "run"):
            raise ValidationError(
                "The run hook must be enabled in the MicroVM image to pass the run hook payload"
            )
        memory = memory_mib(version.config)
        # Serializable (PostgreSQL) or the one writer (SQLite): two runs racing for the last of
        # the quota cannot both see it free.
        in_use = tx.microvms.live_memory_mib(context.account, context.region)
        if in_use + memory > service.settings.quotas.microvm_memory_mib:
            raise QuotaExceededError(
                "The base maximum allocated memory limit has been reached for this account."
            )
        placement = service.microvms.place(tx, version, memory)
        microvm_id = f"microvm-{uuid.uuid4()}"
        # The endpoint has a UUID of its own, as on AWS.
        endpoint = f"{uuid.uuid4()}.lambda-microvm.{context.region}.localhost"
        duration = params.get("maximumDurationInSeconds") or DEFAULT_MAXIMUM_DURATION
        run_config = {key: params.get(key) for key in RUN_CONFIG_MEMBERS}
        run_config.update(
            {
                "ingressNetworkConnectors": ingress,
                "egressNetworkConnectors": egress,
                "maximumDurationInSeconds": duration,
                # Kept until the run hook has had it; dropped once RUNNING (it may be sensitive).
                "runHookPayload": payload,
            }
        )
        microvm = tx.microvms.add(
            microvm_id,
            context.account,
            context.region,
            version.image_arn,
            version.label,
            endpoint,
            memory,
            duration,
            params.get("idlePolicy"),
            run_config,
            placement.host_id,
            placement.admission_mib,
        )
        service.after_commit(tx, lambda: service.microvms.schedule_start(microvm_id))
        return microvm_detail(microvm)

    return idempotent(service, context, "RunMicrovm", params, perform)


@operation("GetMicrovm")
def get_microvm(service: Service, context: RequestContext, params: Params) -> Result:
    return microvm_detail(service.read(lambda tx: load_microvm(tx, context, params["microvmIdentifier"])))


@operation("ListMicrovms")
def list_microvms(service: Service, context: RequestContext, params: Params) -> Result:
    image_filter = params.get("imageIdentifier")
    version_filter = params.get("imageVersion")
    if image_filter is not None:
        arn = parse_image_arn(image_filter)
        if arn.account != context.account:
            raise AccessDeniedError(f"User is not authorized to access MicroVM image {image_filter}.")
        known = service.read(
            lambda tx: tx.microvms.any_of_image(image_filter) or tx.images.get(image_filter) is not None
        )
        if not known:
            raise NotFoundError(image_not_found(image_filter))

    def fetch(after: list[Any] | None, limit: int) -> list[Microvm]:
        return service.read(
            lambda tx: tx.microvms.page(
                context.account, context.region, image_filter, version_filter, after, limit
            )
        )

    microvms, token = paginate(
        service,
        context,
        "ListMicrovms",
        params,
        {"image": image_filter, "version": version_filter},
        fetch,
        lambda microvm: [microvm.started_at, microvm.id],
    )
    items = [
        {
            "microvmId": microvm.id,
            "state": microvm.state.wire,
            "imageArn": microvm.image_arn,
            "imageVersion": microvm.image_version,
            "startedAt": microvm.started_at,
        }
        for microvm in microvms
    ]
    return {"items": items, "nextToken": token}


def _must_move(microvm: Microvm, verb: str, source: MicrovmState, *reached: MicrovmState) -> bool:
    """The guard of Suspend and Resume: True when the MicroVM is in `source` and must move; False
    when it is on its way or there already (nothing to do); an error for any other state."""
    state = microvm.state
    if state in (MicrovmState.TERMINATING, MicrovmState.TERMINATED):
        raise ValidationError(terminated_message(microvm.id))
    if state in reached:
        return False
    if state is not source:
        raise ConflictError(
            f"The MicroVM {microvm.id} is {state.wire} and cannot be {verb} until it is {source.wire}.",
            resourceId=microvm.id,
            resourceType="Microvm",
        )
    return True


@operation("SuspendMicrovm")
def suspend_microvm(service: Service, context: RequestContext, params: Params) -> Result:
    def perform(tx: Tx) -> None:
        microvm = load_microvm(tx, context, params["microvmIdentifier"])
        if _must_move(
            microvm, "suspended", MicrovmState.RUNNING, MicrovmState.SUSPENDING, MicrovmState.SUSPENDED
        ):
            request_suspend(service, microvm.id)

    service.transact(perform)
    return {}


def request_suspend(service: Service, microvm_id: str) -> bool:
    """RUNNING → SUSPENDING, for the API and for the idle timer alike."""

    def perform(tx: Tx) -> bool:
        if tx.microvms.transition(microvm_id, MicrovmState.SUSPENDING, expect=[MicrovmState.RUNNING]) is None:
            return False
        service.after_commit(tx, lambda: service.microvms.schedule_suspend(microvm_id))
        return True

    return service.transact(perform)


@operation("ResumeMicrovm")
def resume_microvm(service: Service, context: RequestContext, params: Params) -> Result:
    def perform(tx: Tx) -> None:
        microvm = load_microvm(tx, context, params["microvmIdentifier"])
        if not _must_move(
            microvm, "resumed", MicrovmState.SUSPENDED, MicrovmState.RESUMING, MicrovmState.RUNNING
        ):
            return
        # Recorded before answering, so that a restart finishes a resume that was acknowledged.
        begin_resume(service, microvm.id)
        service.after_commit(tx, lambda: service.microvms.schedule_resume(microvm.id))

    service.transact(perform)
    return {}


def begin_resume(service: Service, microvm_id: str) -> bool:
    """SUSPENDED → RESUMING (PENDING on the wire, as seen live, spec §2.18)."""
    return service.transact(lambda tx: tx.microvms.transition(microvm_id, MicrovmState.RESUMING)) is not None


@operation("TerminateMicrovm")
def terminate_microvm(service: Service, context: RequestContext, params: Params) -> Result:
    def perform(tx: Tx) -> None:
        microvm = load_microvm(tx, context, params["microvmIdentifier"])
        request_terminate(service, microvm.id)

    service.transact(perform)
    return {}


def request_terminate(service: Service, microvm_id: str, reason: str | None = None) -> bool:
    """Any live state → TERMINATING; the engine calls the terminate hook and frees the sandbox.
    `reason` becomes the stateReason (a plain terminate ends with "Success.")."""

    def perform(tx: Tx) -> bool:
        moved = tx.microvms.transition(microvm_id, MicrovmState.TERMINATING, reason=reason or KEEP)
        if moved is None:
            return False
        service.after_commit(tx, lambda: service.microvms.schedule_terminate(microvm_id))
        return True

    return service.transact(perform)


def mark_terminated(service: Service, microvm_id: str, reason: str) -> Microvm | None:
    """Any live state → TERMINATED at once (a failure, a lost sandbox, `openmicrovm cleanup`);
    the MicroVM as it is now, or None when it had already ended."""
    return service.transact(
        lambda tx: tx.microvms.transition(
            microvm_id, MicrovmState.TERMINATED, reason=reason, terminated_at=service.clock()
        )
    )
