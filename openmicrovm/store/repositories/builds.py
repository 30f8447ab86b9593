"""Image builds, one per target architecture of a version."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from openmicrovm.states import BUILD_MOVES, UNFINISHED_BUILD_STATES, BuildState
from openmicrovm.store.connection import Connection, Row, placeholders, scalar
from openmicrovm.store.records import Build, BuildJob
from openmicrovm.store.repositories.moves import KEEP, count_by_state, move

# Filters of ListMicrovmImageBuilds: the API's member → the column.
FILTER_COLUMNS = {
    "architecture": "architecture",
    "chipset": "chipset",
    "chipsetGeneration": "chipset_generation",
}


def _build(row: Row) -> Build:
    return Build(
        build_id=row["build_id"],
        image_arn=row["image_arn"],
        version_number=row["version_number"],
        architecture=row["architecture"],
        chipset=row["chipset"],
        chipset_generation=row["chipset_generation"],
        state=BuildState(row["state"]),
        state_reason=row["state_reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        artifacts=json.loads(row["artifacts"]) if row["artifacts"] else None,
        host_id=row["host_id"],
    )


class BuildsRepository:
    def __init__(self, connection: Connection, clock: Callable[[], float]) -> None:
        self.connection = connection
        self.clock = clock

    def add(
        self,
        build_id: str,
        image_arn: str,
        version_number: int,
        architecture: str,
        chipset: str,
        generation: str,
    ) -> Build:
        now = self.clock()
        row = self.connection.one(
            "INSERT INTO builds (build_id, image_arn, version_number, architecture, chipset, chipset_generation, "
            "state, state_reason, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?) RETURNING *",
            (
                build_id,
                image_arn,
                version_number,
                architecture,
                chipset,
                generation,
                BuildState.PENDING.value,
                now,
                now,
            ),
        )
        assert row is not None
        return _build(row)

    def get(self, build_id: str) -> Build | None:
        row = self.connection.one("SELECT * FROM builds WHERE build_id = ?", (build_id,))
        return None if row is None else _build(row)

    def of_version(self, image_arn: str, number: int) -> list[Build]:
        rows = self.connection.all(
            "SELECT * FROM builds WHERE image_arn = ? AND version_number = ? ORDER BY created_at, build_id",
            (image_arn, number),
        )
        return [_build(row) for row in rows]

    def of_image(self, image_arn: str) -> list[Build]:
        rows = self.connection.all("SELECT * FROM builds WHERE image_arn = ?", (image_arn,))
        return [_build(row) for row in rows]

    def page(
        self, image_arn: str, number: int, filters: dict[str, str | None], after: list[Any] | None, limit: int
    ) -> list[Build]:
        sql = "SELECT * FROM builds WHERE image_arn = ? AND version_number = ?"
        params: list[Any] = [image_arn, number]
        for member, column in FILTER_COLUMNS.items():
            if filters.get(member) is not None:
                sql += f" AND {column} = ?"
                params.append(filters[member])
        if after is not None:
            sql += " AND (created_at > ? OR (created_at = ? AND build_id > ?))"
            params += [after[0], after[0], after[1]]
        rows = self.connection.all(sql + " ORDER BY created_at, build_id LIMIT ?", [*params, limit])
        return [_build(row) for row in rows]

    def unfinished_ids(self, host_id: str | None = None) -> list[str]:
        """Builds not finished yet: all of them, or those a host has taken."""
        states = [state.value for state in UNFINISHED_BUILD_STATES]
        sql = f"SELECT build_id FROM builds WHERE state IN ({placeholders(len(states))})"
        if host_id is not None:
            sql += " AND host_id = ?"
            states.append(host_id)
        rows = self.connection.all(sql + " ORDER BY created_at", states)
        return [row["build_id"] for row in rows]

    def unclaimed_ids(self, architectures: list[str], limit: int) -> list[str]:
        """Unfinished builds for these architectures that no host holds (new ones, and those of a
        lost host), oldest first."""
        if not architectures or limit <= 0:
            return []
        states = [state.value for state in UNFINISHED_BUILD_STATES]
        rows = self.connection.all(
            f"SELECT build_id FROM builds WHERE state IN ({placeholders(len(states))}) AND host_id IS NULL "
            f"AND architecture IN ({placeholders(len(architectures))}) ORDER BY created_at LIMIT ?",
            (*states, *architectures, limit),
        )
        return [row["build_id"] for row in rows]

    def unclaimed_architectures(self) -> set[str]:
        states = [state.value for state in UNFINISHED_BUILD_STATES]
        rows = self.connection.all(
            f"SELECT DISTINCT architecture FROM builds WHERE host_id IS NULL "
            f"AND state IN ({placeholders(len(states))})",
            states,
        )
        return {row["architecture"] for row in rows}

    def claim(self, build_id: str, host_id: str) -> bool:
        """Take an unfinished build no host holds: True when this host got it."""
        states = [state.value for state in UNFINISHED_BUILD_STATES]
        changed = self.connection.execute(
            f"UPDATE builds SET host_id = ? WHERE build_id = ? AND host_id IS NULL "
            f"AND state IN ({placeholders(len(states))})",
            (host_id, build_id, *states),
        )
        return changed == 1

    def running_on(self, host_id: str) -> int:
        """How many builds a host holds and has not finished."""
        states = [state.value for state in UNFINISHED_BUILD_STATES]
        return scalar(
            self.connection,
            f"SELECT COUNT(*) FROM builds WHERE host_id = ? AND state IN ({placeholders(len(states))})",
            (host_id, *states),
        )

    def release(self, host_id: str) -> list[str]:
        """A lost host's unfinished builds are let go, for another host to take and start again
        from the beginning (IN_PROGRESS → IN_PROGRESS, as after a restart)."""
        states = [state.value for state in UNFINISHED_BUILD_STATES]
        rows = self.connection.all(
            f"UPDATE builds SET host_id = NULL WHERE host_id = ? "
            f"AND state IN ({placeholders(len(states))}) RETURNING build_id",
            (host_id, *states),
        )
        return [row["build_id"] for row in rows]

    def job(self, build_id: str) -> BuildJob | None:
        row = self.connection.one(
            "SELECT b.*, v.config, i.name, i.region, i.account FROM builds b "
            "JOIN versions v ON v.image_arn = b.image_arn AND v.number = b.version_number "
            "JOIN images i ON i.arn = b.image_arn WHERE b.build_id = ?",
            (build_id,),
        )
        if row is None:
            return None
        return BuildJob(
            build=_build(row),
            image_name=row["name"],
            account=row["account"],
            region=row["region"],
            config=json.loads(row["config"]),
        )

    def successful_artifacts(
        self, image_arn: str, number: int, architecture: str | None = None
    ) -> list[dict[str, Any]]:
        """What the SUCCESSFUL builds of a version left (of one architecture, when given)."""
        sql = "SELECT artifacts FROM builds WHERE image_arn = ? AND version_number = ? AND state = ?"
        params: list[Any] = [image_arn, number, BuildState.SUCCESSFUL.value]
        if architecture is not None:
            sql += " AND architecture = ?"
            params.append(architecture)
        rows = self.connection.all(sql + " AND artifacts IS NOT NULL", params)
        return [json.loads(row["artifacts"]) for row in rows]

    def successful(self) -> list[Build]:
        rows = self.connection.all("SELECT * FROM builds WHERE state = ?", (BuildState.SUCCESSFUL.value,))
        return [_build(row) for row in rows]

    def all_successful_artifacts(self) -> list[dict[str, Any]]:
        rows = self.connection.all(
            "SELECT artifacts FROM builds WHERE state = ? AND artifacts IS NOT NULL",
            (BuildState.SUCCESSFUL.value,),
        )
        return [json.loads(row["artifacts"]) for row in rows]

    def transition(
        self,
        build_id: str,
        to: BuildState,
        expect: Iterable[BuildState] | None = None,
        reason: str | None = KEEP,
        artifacts: dict[str, Any] | None = None,
    ) -> Build | None:
        fields = {} if artifacts is None else {"artifacts": json.dumps(artifacts)}
        row = move(
            self.connection,
            "builds",
            ("build_id = ?", (build_id,)),
            BUILD_MOVES,
            to,
            expect,
            ("updated_at", self.clock()),
            reason,
            **fields,
        )
        return None if row is None else _build(row)

    def counts_by_state(self) -> dict[BuildState, int]:
        return count_by_state(self.connection, "builds", BuildState)
