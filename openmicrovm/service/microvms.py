"""MicroVMs: run, read, list, suspend, resume, terminate (spec §2.14–2.19, §3.4, §5.1), and the
state changes the lifecycle engine reports."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
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
from openmicrovm.service.images import LIVE_MICROVM_STATES
from openmicrovm.service.pagination import paginate
from openmicrovm.service.records import find_image, image_not_found, version_label, version_number
from openmicrovm.store.db import Row

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


def microvm_not_found(microvm_id: str) -> str:
    return f"MicroVM not found: {microvm_id}"


def terminated_message(microvm_id: str) -> str:
    return f"The MicroVM {microvm_id} has been terminated and its state cannot be changed."


def load_microvm(service: Service, context: RequestContext, microvm_id: str) -> Row:
    """MicroVMs have no ARN: another account's id is simply not found."""
    row = service.db.one(
        "SELECT * FROM microvms WHERE id = ? AND account = ? AND region = ?",
        (microvm_id, context.account, context.region),
    )
    if row is None:
        raise NotFoundError(microvm_not_found(microvm_id), resourceId=microvm_id, resourceType="Microvm")
    return row


def microvm_detail(row: Row) -> dict[str, Any]:
    config = json.loads(row["config"])
    detail = {key: config.get(key) for key in RUN_CONFIG_MEMBERS if key not in ("logging",)}
    detail.update(
        {
            "endpoint": row["endpoint"],
            "imageArn": row["image_arn"],
            "imageVersion": row["image_version"],
            "microvmId": row["id"],
            "startedAt": row["started_at"],
            "state": row["state"],
            "stateReason": row["state_reason"],
            "terminatedAt": row["terminated_at"],
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


def _resolve_version(service: Service, context: RequestContext, identifier: str, label: str | None) -> Row:
    """The version to run: the one asked for, or the newest SUCCESSFUL and ACTIVE one."""
    if not identifier.startswith("arn:"):
        raise ValidationError("Malformed ARN - doesn't start with 'arn:'")
    arn = parse_image_arn(identifier)
    no_active = f"No active version found for MicroVM image {identifier}"
    if arn.account != context.account and arn.account != "aws":
        raise AccessDeniedError(
            f"User is not authorized to run MicroVM image {identifier}: it belongs to another account."
        )
    image = find_image(service.db, str(arn))
    if image is None or arn.region != context.region or image["state"] == "DELETING":
        raise NotFoundError(no_active)
    if label is None:
        version = service.db.one(
            "SELECT * FROM versions WHERE image_arn = ? AND state = 'SUCCESSFUL' AND status = 'ACTIVE' "
            "ORDER BY number DESC LIMIT 1",
            (image["arn"],),
        )
    else:
        number = version_number(label)
        version = service.db.one(
            "SELECT * FROM versions WHERE image_arn = ? AND number = ? AND state = 'SUCCESSFUL' AND status = 'ACTIVE'",
            (image["arn"], number if number is not None else -1),
        )
        no_active = f"No active version found for MicroVM image {identifier}, Version: {label}"
    if version is None:
        raise NotFoundError(no_active)
    return version


def _snapshot_memory_bytes(service: Service, version: Row) -> int:
    sizes = [
        json.loads(row["artifacts"]).get("memorySnapshotSizeInBytes", 0)
        for row in service.db.all(
            "SELECT artifacts FROM builds WHERE image_arn = ? AND version_number = ? AND artifacts IS NOT NULL",
            (version["image_arn"], version["number"]),
        )
    ]
    return max(sizes, default=0)


@operation("RunMicrovm")
def run_microvm(service: Service, context: RequestContext, params: Params) -> Result:
    def perform() -> Result:
        version = _resolve_version(service, context, params["imageIdentifier"], params.get("imageVersion"))
        config = json.loads(version["config"])
        payload = params.get("runHookPayload")
        if payload and not hook_enabled(config, "run"):
            raise ValidationError(
                "The run hook must be enabled in the MicroVM image to pass the run hook payload"
            )
        _check_idle_policy(service, params.get("idlePolicy"))
        ingress = _connectors(context, params.get("ingressNetworkConnectors"), "ingress")
        egress = _connectors(context, params.get("egressNetworkConnectors"), "egress")
        memory = memory_mib(config)
        db = service.db
        in_use = db.scalar(
            f"SELECT COALESCE(SUM(memory_mib), 0) FROM microvms WHERE account = ? AND region = ? "
            f"AND state IN ({','.join('?' * len(LIVE_MICROVM_STATES))})",
            (context.account, context.region, *LIVE_MICROVM_STATES),
        )
        if in_use + memory > service.settings.quotas.microvm_memory_mib:
            raise QuotaExceededError(
                "The base maximum allocated memory limit has been reached for this account."
            )
        service.microvms.check_capacity(memory, _snapshot_memory_bytes(service, version))
        now = service.clock()
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
        policy = params.get("idlePolicy")
        db.execute(
            "INSERT INTO microvms (id, account, region, image_arn, image_version, state, state_reason, endpoint, "
            "memory_mib, started_at, terminated_at, deadline_at, last_activity_at, suspended_at, "
            "max_idle_seconds, suspended_ttl_seconds, auto_resume, config) "
            "VALUES (?, ?, ?, ?, ?, 'PENDING', NULL, ?, ?, ?, NULL, ?, ?, NULL, ?, ?, ?, ?)",
            (
                microvm_id,
                context.account,
                context.region,
                version["image_arn"],
                version_label(version["number"]),
                endpoint,
                memory,
                now,
                now + duration,
                now,
                policy["maxIdleDurationSeconds"] if policy else None,
                policy["suspendedDurationSeconds"] if policy else None,
                1 if policy and policy["autoResumeEnabled"] else 0,
                json.dumps(run_config),
            ),
        )
        service.after_commit(lambda: service.microvms.schedule_start(microvm_id))
        row = db.one("SELECT * FROM microvms WHERE id = ?", (microvm_id,))
        assert row is not None
        return microvm_detail(row)

    return idempotent(service, context, "RunMicrovm", params, perform)


@operation("GetMicrovm")
def get_microvm(service: Service, context: RequestContext, params: Params) -> Result:
    return microvm_detail(load_microvm(service, context, params["microvmIdentifier"]))


@operation("ListMicrovms")
def list_microvms(service: Service, context: RequestContext, params: Params) -> Result:
    image_filter = params.get("imageIdentifier")
    version_filter = params.get("imageVersion")
    if image_filter is not None:
        arn = parse_image_arn(image_filter)
        if arn.account != context.account:
            raise AccessDeniedError(f"User is not authorized to access MicroVM image {image_filter}.")
        known = service.db.scalar("SELECT 1 FROM microvms WHERE image_arn = ? LIMIT 1", (image_filter,))
        if not known and find_image(service.db, image_filter) is None:
            raise NotFoundError(image_not_found(image_filter))

    def fetch(after: list[Any] | None, limit: int) -> list[Row]:
        sql = "SELECT * FROM microvms WHERE account = ? AND region = ?"
        args: list[Any] = [context.account, context.region]
        if image_filter is not None:
            sql += " AND image_arn = ?"
            args.append(image_filter)
        if version_filter is not None:
            sql += " AND image_version = ?"
            args.append(version_filter)
        if after is not None:
            sql += " AND (started_at > ? OR (started_at = ? AND id > ?))"
            args += [after[0], after[0], after[1]]
        return service.db.all(sql + " ORDER BY started_at, id LIMIT ?", [*args, limit])

    rows, token = paginate(
        service,
        context,
        "ListMicrovms",
        params,
        {"image": image_filter, "version": version_filter},
        fetch,
        lambda row: [row["started_at"], row["id"]],
    )
    items = [
        {
            "microvmId": row["id"],
            "state": row["state"],
            "imageArn": row["image_arn"],
            "imageVersion": row["image_version"],
            "startedAt": row["started_at"],
        }
        for row in rows
    ]
    return {"items": items, "nextToken": token}


@operation("SuspendMicrovm")
def suspend_microvm(service: Service, context: RequestContext, params: Params) -> Result:
    with service.transaction():
        row = load_microvm(service, context, params["microvmIdentifier"])
        state = row["state"]
        if state in ("TERMINATING", "TERMINATED"):
            raise ValidationError(terminated_message(row["id"]))
        if state in ("SUSPENDING", "SUSPENDED"):
            return {}
        if state != "RUNNING":
            raise ConflictError(
                f"The MicroVM {row['id']} is {state} and cannot be suspended until it is RUNNING.",
                resourceId=row["id"],
                resourceType="Microvm",
            )
        request_suspend(service, row["id"])
        return {}


def request_suspend(service: Service, microvm_id: str) -> bool:
    """RUNNING → SUSPENDING, for the API and for the idle timer alike."""
    if not transition(service, microvm_id, ("RUNNING",), "SUSPENDING"):
        return False
    service.after_commit(lambda: service.microvms.schedule_suspend(microvm_id))
    return True


@operation("ResumeMicrovm")
def resume_microvm(service: Service, context: RequestContext, params: Params) -> Result:
    with service.transaction():
        row = load_microvm(service, context, params["microvmIdentifier"])
        state = row["state"]
        if state in ("TERMINATING", "TERMINATED"):
            raise ValidationError(terminated_message(row["id"]))
        if state == "RUNNING" or is_resuming(row):
            return {}
        if state != "SUSPENDED":
            raise ConflictError(
                f"The MicroVM {row['id']} is {state} and cannot be resumed until it is SUSPENDED.",
                resourceId=row["id"],
                resourceType="Microvm",
            )
        # Recorded before answering, so that a restart finishes a resume that was acknowledged.
        begin_resume(service, row["id"])
        service.after_commit(lambda: service.microvms.schedule_resume(row["id"]))
        return {}


def is_resuming(row: Row) -> bool:
    """A MicroVM on its way back from SUSPENDED is PENDING with its suspended_at kept."""
    return row["state"] == "PENDING" and row["suspended_at"] is not None


def begin_resume(service: Service, microvm_id: str) -> bool:
    """SUSPENDED → PENDING (the brief PENDING seen on resume live, spec §2.18)."""
    return transition(service, microvm_id, ("SUSPENDED",), "PENDING")


@operation("TerminateMicrovm")
def terminate_microvm(service: Service, context: RequestContext, params: Params) -> Result:
    with service.transaction():
        row = load_microvm(service, context, params["microvmIdentifier"])
        request_terminate(service, row["id"])
        return {}


def request_terminate(service: Service, microvm_id: str, reason: str | None = None) -> bool:
    """Any live state → TERMINATING; the engine calls the terminate hook and frees the sandbox.
    `reason` becomes the stateReason (a plain terminate ends with "Success.")."""
    columns = {"state_reason": reason} if reason else {}
    if not transition(service, microvm_id, LIVE_MICROVM_STATES[:-1], "TERMINATING", **columns):
        return False
    service.after_commit(lambda: service.microvms.schedule_terminate(microvm_id))
    return True


def transition(
    service: Service, microvm_id: str, from_states: Iterable[str], to_state: str, **columns: Any
) -> bool:
    """Compare-and-set of a MicroVM's state (plus other columns); False when it was not in from_states."""
    states = tuple(from_states)
    assignments = ", ".join(f"{name} = ?" for name in columns)
    sql = f"UPDATE microvms SET state = ?{', ' + assignments if assignments else ''} WHERE id = ? AND state IN ({','.join('?' * len(states))})"
    with service.transaction() as db:
        return db.execute(sql, (to_state, *columns.values(), microvm_id, *states)) == 1


def mark_terminated(service: Service, microvm_id: str, reason: str) -> bool:
    return transition(
        service,
        microvm_id,
        LIVE_MICROVM_STATES,
        "TERMINATED",
        state_reason=reason,
        terminated_at=service.clock(),
    )
