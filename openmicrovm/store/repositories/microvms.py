"""MicroVMs, with the timers of spec §5.5 kept in columns so that they survive a restart."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from openmicrovm.states import LIVE_MICROVM_STATES, MICROVM_MOVES, MicrovmState
from openmicrovm.store.connection import Connection, Row, placeholders, scalar
from openmicrovm.store.records import Microvm
from openmicrovm.store.repositories.moves import KEEP, count_by_state, move

_LIVE = [state.value for state in sorted(LIVE_MICROVM_STATES)]
_LIVE_IN = f"state IN ({placeholders(len(_LIVE))})"


def _microvm(row: Row) -> Microvm:
    return Microvm(
        id=row["id"],
        account=row["account"],
        region=row["region"],
        image_arn=row["image_arn"],
        image_version=row["image_version"],
        state=MicrovmState(row["state"]),
        state_reason=row["state_reason"],
        state_changed_at=row["state_changed_at"],
        endpoint=row["endpoint"],
        memory_mib=row["memory_mib"],
        started_at=row["started_at"],
        terminated_at=row["terminated_at"],
        deadline_at=row["deadline_at"],
        last_activity_at=row["last_activity_at"],
        suspended_at=row["suspended_at"],
        max_idle_seconds=row["max_idle_seconds"],
        suspended_ttl_seconds=row["suspended_ttl_seconds"],
        auto_resume=bool(row["auto_resume"]),
        config=json.loads(row["config"]),
        host_id=row["host_id"],
        admission_mib=row["admission_mib"],
    )


class MicrovmsRepository:
    def __init__(self, connection: Connection, clock: Callable[[], float]) -> None:
        self.connection = connection
        self.clock = clock

    def add(
        self,
        microvm_id: str,
        account: str,
        region: str,
        image_arn: str,
        image_version: str,
        endpoint: str,
        memory_mib: int,
        maximum_duration_seconds: float,
        idle_policy: dict[str, Any] | None,
        config: dict[str, Any],
        host_id: str | None = None,
        admission_mib: int = 0,
    ) -> Microvm:
        """A new PENDING MicroVM on a host; its timers start now."""
        now = self.clock()
        row = self.connection.one(
            "INSERT INTO microvms (id, account, region, image_arn, image_version, state, state_reason, "
            "state_changed_at, endpoint, memory_mib, started_at, terminated_at, deadline_at, last_activity_at, "
            "suspended_at, max_idle_seconds, suspended_ttl_seconds, auto_resume, config, host_id, admission_mib) "
            "VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, NULL, ?, ?, NULL, ?, ?, ?, ?, ?, ?) RETURNING *",
            (
                microvm_id,
                account,
                region,
                image_arn,
                image_version,
                MicrovmState.PENDING.value,
                now,
                endpoint,
                memory_mib,
                now,
                now + maximum_duration_seconds,
                now,
                idle_policy["maxIdleDurationSeconds"] if idle_policy else None,
                idle_policy["suspendedDurationSeconds"] if idle_policy else None,
                1 if idle_policy and idle_policy["autoResumeEnabled"] else 0,
                json.dumps(config),
                host_id,
                admission_mib,
            ),
        )
        assert row is not None
        return _microvm(row)

    def get(self, microvm_id: str) -> Microvm | None:
        row = self.connection.one("SELECT * FROM microvms WHERE id = ?", (microvm_id,))
        return None if row is None else _microvm(row)

    def owned(self, microvm_id: str, account: str, region: str) -> Microvm | None:
        """The MicroVM if it is the caller's: another account's is simply not there."""
        row = self.connection.one(
            "SELECT * FROM microvms WHERE id = ? AND account = ? AND region = ?",
            (microvm_id, account, region),
        )
        return None if row is None else _microvm(row)

    def by_endpoint(self, hostname: str) -> Microvm | None:
        row = self.connection.one("SELECT * FROM microvms WHERE endpoint = ?", (hostname,))
        return None if row is None else _microvm(row)

    def state_of(self, microvm_id: str) -> MicrovmState | None:
        state = scalar(self.connection, "SELECT state FROM microvms WHERE id = ?", (microvm_id,))
        return None if state is None else MicrovmState(state)

    def page(
        self,
        account: str,
        region: str,
        image_arn: str | None,
        image_version: str | None,
        after: list[Any] | None,
        limit: int,
    ) -> list[Microvm]:
        sql = "SELECT * FROM microvms WHERE account = ? AND region = ?"
        params: list[Any] = [account, region]
        if image_arn is not None:
            sql += " AND image_arn = ?"
            params.append(image_arn)
        if image_version is not None:
            sql += " AND image_version = ?"
            params.append(image_version)
        if after is not None:
            sql += " AND (started_at > ? OR (started_at = ? AND id > ?))"
            params += [after[0], after[0], after[1]]
        rows = self.connection.all(sql + " ORDER BY started_at, id LIMIT ?", [*params, limit])
        return [_microvm(row) for row in rows]

    def any_of_image(self, image_arn: str) -> bool:
        return (
            scalar(self.connection, "SELECT 1 FROM microvms WHERE image_arn = ? LIMIT 1", (image_arn,))
            is not None
        )

    def live_memory_mib(self, account: str, region: str) -> int:
        """Memory held by the account's live MicroVMs in a region (the quota's measure)."""
        return scalar(
            self.connection,
            f"SELECT COALESCE(SUM(memory_mib), 0) FROM microvms WHERE account = ? AND region = ? AND {_LIVE_IN}",
            (account, region, *_LIVE),
        )

    def count_live(self, image_arn: str, image_version: str | None = None) -> int:
        sql, params = f"SELECT COUNT(*) FROM microvms WHERE image_arn = ? AND {_LIVE_IN}", [image_arn, *_LIVE]
        if image_version is not None:
            sql += " AND image_version = ?"
            params.append(image_version)
        return scalar(self.connection, sql, params)

    def live(self, host_id: str | None = None) -> list[Microvm]:
        """Live MicroVMs: all of them, or those on one host."""
        sql, params = f"SELECT * FROM microvms WHERE {_LIVE_IN}", list(_LIVE)
        if host_id is not None:
            sql += " AND host_id = ?"
            params.append(host_id)
        return [_microvm(row) for row in self.connection.all(sql, params)]

    def adopt_unplaced(self, host_id: str) -> int:
        """MicroVMs from before hosts existed (host_id NULL) become this host's: the one-host
        server that wrote them is the one starting now."""
        return self.connection.execute("UPDATE microvms SET host_id = ? WHERE host_id IS NULL", (host_id,))

    def host_of(self, microvm_id: str) -> str | None:
        return scalar(self.connection, "SELECT host_id FROM microvms WHERE id = ?", (microvm_id,))

    def starting_mib_by_host(self) -> dict[str, int]:
        """Per host, the snapshot memory of MicroVMs placed there and not yet RUNNING: taken since
        the host last said how much it has free, so placement counts it against the host."""
        rows = self.connection.all(
            "SELECT host_id, COALESCE(SUM(admission_mib), 0) AS mib FROM microvms "
            "WHERE state IN (?, ?) AND host_id IS NOT NULL GROUP BY host_id",
            (MicrovmState.PENDING.value, MicrovmState.RESUMING.value),
        )
        return {row["host_id"]: row["mib"] for row in rows}

    def past_deadline(self, now: float) -> list[Microvm]:
        """Live MicroVMs (not yet terminating) past their maximum duration."""
        states = [s.value for s in LIVE_MICROVM_STATES if s is not MicrovmState.TERMINATING]
        rows = self.connection.all(
            f"SELECT * FROM microvms WHERE state IN ({placeholders(len(states))}) AND deadline_at <= ?",
            (*states, now),
        )
        return [_microvm(row) for row in rows]

    def idle_past_policy(self, now: float) -> list[Microvm]:
        """RUNNING MicroVMs idle for longer than their idle policy allows."""
        rows = self.connection.all(
            "SELECT * FROM microvms WHERE state = ? AND max_idle_seconds IS NOT NULL "
            "AND last_activity_at + max_idle_seconds <= ?",
            (MicrovmState.RUNNING.value, now),
        )
        return [_microvm(row) for row in rows]

    def suspended_past_ttl(self, now: float) -> list[Microvm]:
        rows = self.connection.all(
            "SELECT * FROM microvms WHERE state = ? AND suspended_ttl_seconds IS NOT NULL "
            "AND suspended_at + suspended_ttl_seconds <= ?",
            (MicrovmState.SUSPENDED.value, now),
        )
        return [_microvm(row) for row in rows]

    def record_activity(self, microvm_id: str, now: float) -> None:
        """Traffic through the endpoint: a RUNNING MicroVM's idle timer starts again."""
        self.connection.execute(
            "UPDATE microvms SET last_activity_at = ? WHERE id = ? AND state = ?",
            (now, microvm_id, MicrovmState.RUNNING.value),
        )

    def transition(
        self,
        microvm_id: str,
        to: MicrovmState,
        expect: Iterable[MicrovmState] | None = None,
        reason: str | None = KEEP,
        **fields: Any,
    ) -> Microvm | None:
        """Move along MICROVM_MOVES. `fields` are other columns to set in the same write
        (last_activity_at, suspended_at, terminated_at; `config` as a dict)."""
        if "config" in fields:
            fields["config"] = json.dumps(fields["config"])
        row = move(
            self.connection,
            "microvms",
            ("id = ?", (microvm_id,)),
            MICROVM_MOVES,
            to,
            expect,
            ("state_changed_at", self.clock()),
            reason,
            **fields,
        )
        return None if row is None else _microvm(row)

    def counts_by_state(self) -> dict[MicrovmState, int]:
        return count_by_state(self.connection, "microvms", MicrovmState)
