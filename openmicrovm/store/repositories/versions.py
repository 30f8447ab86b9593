"""Image versions. Every write here also refreshes the image's latest active and failed versions."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from openmicrovm.states import VERSION_MOVES, VersionState, VersionStatus
from openmicrovm.store.connection import Connection, Row, placeholders, scalar
from openmicrovm.store.records import Version
from openmicrovm.store.repositories.moves import KEEP, move


def _version(row: Row) -> Version:
    return Version(
        image_arn=row["image_arn"],
        number=row["number"],
        state=VersionState(row["state"]),
        status=VersionStatus(row["status"]),
        state_reason=row["state_reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        config=json.loads(row["config"]),
    )


class VersionsRepository:
    def __init__(self, connection: Connection, clock: Callable[[], float]) -> None:
        self.connection = connection
        self.clock = clock

    def get(self, image_arn: str, number: int) -> Version | None:
        row = self.connection.one(
            "SELECT * FROM versions WHERE image_arn = ? AND number = ?", (image_arn, number)
        )
        return None if row is None else _version(row)

    def add(self, image_arn: str, number: int, config: dict[str, Any]) -> Version:
        """A new PENDING, INACTIVE version."""
        now = self.clock()
        row = self.connection.one(
            "INSERT INTO versions (image_arn, number, state, status, state_reason, created_at, updated_at, config) "
            "VALUES (?, ?, ?, ?, NULL, ?, ?, ?) RETURNING *",
            (
                image_arn,
                number,
                VersionState.PENDING.value,
                VersionStatus.INACTIVE.value,
                now,
                now,
                json.dumps(config),
            ),
        )
        assert row is not None
        return _version(row)

    def count(self, image_arn: str, states: Iterable[VersionState] | None = None) -> int:
        sql, params = "SELECT COUNT(*) FROM versions WHERE image_arn = ?", [image_arn]
        if states is not None:
            wanted = [state.value for state in states]
            sql += f" AND state IN ({placeholders(len(wanted))})"
            params += wanted
        return scalar(self.connection, sql, params)

    def page(self, image_arn: str, after: list[Any] | None, limit: int) -> list[Version]:
        rows = self.connection.all(
            "SELECT * FROM versions WHERE image_arn = ? AND number > ? ORDER BY number LIMIT ?",
            (image_arn, after[0] if after else 0, limit),
        )
        return [_version(row) for row in rows]

    def runnable(self, image_arn: str, number: int | None) -> Version | None:
        """The SUCCESSFUL and ACTIVE version `number`, or the newest such when number is None."""
        sql = "SELECT * FROM versions WHERE image_arn = ? AND state = ? AND status = ?"
        params: list[Any] = [image_arn, VersionState.SUCCESSFUL.value, VersionStatus.ACTIVE.value]
        if number is not None:
            sql += " AND number = ?"
            params.append(number)
        row = self.connection.one(sql + " ORDER BY number DESC LIMIT 1", params)
        return None if row is None else _version(row)

    def of_image(self, image_arn: str) -> list[Version]:
        rows = self.connection.all("SELECT * FROM versions WHERE image_arn = ? ORDER BY number", (image_arn,))
        return [_version(row) for row in rows]

    def in_state(self, state: VersionState) -> list[Version]:
        rows = self.connection.all("SELECT * FROM versions WHERE state = ?", (state.value,))
        return [_version(row) for row in rows]

    def transition(
        self,
        image_arn: str,
        number: int,
        to: VersionState,
        expect: Iterable[VersionState] | None = None,
        reason: str | None = KEEP,
        status: VersionStatus | None = None,
    ) -> Version | None:
        fields = {} if status is None else {"status": status.value}
        row = move(
            self.connection,
            "versions",
            ("image_arn = ? AND number = ?", (image_arn, number)),
            VERSION_MOVES,
            to,
            expect,
            ("updated_at", self.clock()),
            reason,
            **fields,
        )
        if row is None:
            return None
        self._refresh_latest(image_arn)
        return _version(row)

    def set_status(self, image_arn: str, number: int, status: VersionStatus) -> Version | None:
        """Activate or deactivate a SUCCESSFUL version."""
        row = self.connection.one(
            "UPDATE versions SET status = ?, updated_at = ? WHERE image_arn = ? AND number = ? AND state = ? "
            "RETURNING *",
            (status.value, self.clock(), image_arn, number, VersionState.SUCCESSFUL.value),
        )
        if row is None:
            return None
        self._refresh_latest(image_arn)
        return _version(row)

    def delete(self, image_arn: str, number: int) -> bool:
        """Remove a DELETING version with its builds (its files are already gone)."""
        removed = self.connection.execute(
            "DELETE FROM versions WHERE image_arn = ? AND number = ? AND state = ?",
            (image_arn, number, VersionState.DELETING.value),
        )
        self._refresh_latest(image_arn)
        return removed == 1

    def _refresh_latest(self, image_arn: str) -> None:
        self.connection.execute(
            """UPDATE images SET
                latest_active_version = (SELECT MAX(number) FROM versions v WHERE v.image_arn = images.arn
                                          AND v.state = ? AND v.status = ?),
                latest_failed_version = (SELECT MAX(number) FROM versions v WHERE v.image_arn = images.arn
                                          AND v.state = ?)
            WHERE arn = ?""",
            (VersionState.SUCCESSFUL.value, VersionStatus.ACTIVE.value, VersionState.FAILED.value, image_arn),
        )
