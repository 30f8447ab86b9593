"""MicroVM images (tags included): the aggregate root of versions and builds."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from openmicrovm.states import IMAGE_MOVES, ImageState
from openmicrovm.store.connection import Connection, Row, scalar
from openmicrovm.store.records import Image
from openmicrovm.store.repositories.moves import KEEP, count_by_state, move


def _image(row: Row) -> Image:
    return Image(
        arn=row["arn"],
        account=row["account"],
        region=row["region"],
        name=row["name"],
        id=row["id"],
        state=ImageState(row["state"]),
        state_reason=row["state_reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        next_version=row["next_version"],
        tags=json.loads(row["tags"]),
        latest_active_version=row["latest_active_version"],
        latest_failed_version=row["latest_failed_version"],
    )


class ImagesRepository:
    def __init__(self, connection: Connection, clock: Callable[[], float]) -> None:
        self.connection = connection
        self.clock = clock

    def get(self, arn: str) -> Image | None:
        row = self.connection.one("SELECT * FROM images WHERE arn = ?", (arn,))
        return None if row is None else _image(row)

    def count(self, account: str, region: str) -> int:
        return scalar(
            self.connection, "SELECT COUNT(*) FROM images WHERE account = ? AND region = ?", (account, region)
        )

    def create(
        self, arn: str, account: str, region: str, name: str, image_id: str, tags: dict[str, str]
    ) -> Image:
        """A new image, CREATING, whose first version is 1."""
        now = self.clock()
        row = self.connection.one(
            "INSERT INTO images (arn, account, region, name, id, state, created_at, updated_at, next_version, tags) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?) RETURNING *",
            (arn, account, region, name, image_id, ImageState.CREATING.value, now, now, json.dumps(tags)),
        )
        assert row is not None
        return _image(row)

    def page(
        self, account: str, region: str, name_contains: str | None, after: list[Any] | None, limit: int
    ) -> list[Image]:
        """The caller's images in (created_at, arn) order, after a position from an earlier page."""
        sql = "SELECT * FROM images WHERE account = ? AND region = ?"
        params: list[Any] = [account, region]
        if name_contains is not None:
            sql += " AND " + self.connection.contains("name")
            params.append(name_contains)
        if after is not None:
            sql += " AND (created_at > ? OR (created_at = ? AND arn > ?))"
            params += [after[0], after[0], after[1]]
        rows = self.connection.all(sql + " ORDER BY created_at, arn LIMIT ?", [*params, limit])
        return [_image(row) for row in rows]

    def arns_in_state(self, state: ImageState) -> list[str]:
        rows = self.connection.all("SELECT arn FROM images WHERE state = ?", (state.value,))
        return [row["arn"] for row in rows]

    def transition(
        self,
        arn: str,
        to: ImageState,
        expect: Iterable[ImageState] | None = None,
        reason: str | None = KEEP,
    ) -> Image | None:
        row = move(
            self.connection,
            "images",
            ("arn = ?", (arn,)),
            IMAGE_MOVES,
            to,
            expect,
            ("updated_at", self.clock()),
            reason,
        )
        return None if row is None else _image(row)

    def take_version_number(self, arn: str) -> int:
        """The number of the image's next version, which no later call gets again."""
        row = self.connection.one(
            "UPDATE images SET next_version = next_version + 1 WHERE arn = ? RETURNING next_version", (arn,)
        )
        assert row is not None
        return row["next_version"] - 1

    def set_tags(self, arn: str, tags: dict[str, str]) -> None:
        self.connection.execute("UPDATE images SET tags = ? WHERE arn = ?", (json.dumps(tags), arn))

    def delete(self, arn: str) -> bool:
        """Remove a DELETING image with its versions and builds (its files are already gone)."""
        return (
            self.connection.execute(
                "DELETE FROM images WHERE arn = ? AND state = ?", (arn, ImageState.DELETING.value)
            )
            == 1
        )

    def counts_by_state(self) -> dict[ImageState, int]:
        return count_by_state(self.connection, "images", ImageState)
