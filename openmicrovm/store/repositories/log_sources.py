"""The builds and MicroVMs whose logs go to CloudWatch Logs (their `logging.cloudWatch`)."""

from __future__ import annotations

import json
from typing import Any

from openmicrovm.states import FINISHED_BUILD_STATES, BuildState, MicrovmState
from openmicrovm.store.connection import Connection
from openmicrovm.store.records import LogSource, version_label

# Only rows whose configuration mentions cloudWatch are decoded; the decoded JSON decides.
_MENTIONS_CLOUDWATCH = '%"cloudWatch"%'


def _cloudwatch(config_json: str) -> dict[str, Any] | None:
    logging = json.loads(config_json).get("logging") or {}
    target = logging.get("cloudWatch")
    return target if isinstance(target, dict) else None


class LogSourcesRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def all(self) -> list[LogSource]:
        sources = []
        for row in self.connection.all(
            "SELECT b.build_id, b.version_number, b.state, b.created_at, b.updated_at, i.name, i.region, v.config "
            "FROM builds b JOIN versions v ON v.image_arn = b.image_arn AND v.number = b.version_number "
            "JOIN images i ON i.arn = b.image_arn WHERE v.config LIKE ?",
            (_MENTIONS_CLOUDWATCH,),
        ):
            target = _cloudwatch(row["config"])
            if target is None:
                continue
            finished = BuildState(row["state"]) in FINISHED_BUILD_STATES
            sources.append(
                LogSource(
                    stream=f"builds/{row['build_id']}",
                    resource_id=row["build_id"],
                    region=row["region"],
                    image_name=row["name"],
                    version=version_label(row["version_number"]) or "",
                    cloudwatch=target,
                    created_at=row["created_at"],
                    finished_at=(row["updated_at"] or row["created_at"]) if finished else None,
                )
            )
        for row in self.connection.all(
            "SELECT id, image_arn, image_version, state, started_at, terminated_at, region, config "
            "FROM microvms WHERE config LIKE ?",
            (_MENTIONS_CLOUDWATCH,),
        ):
            target = _cloudwatch(row["config"])
            if target is None:
                continue
            terminated = row["state"] == MicrovmState.TERMINATED.value
            sources.append(
                LogSource(
                    stream=f"microvms/{row['id']}",
                    resource_id=row["id"],
                    region=row["region"],
                    # The image may be gone by now; its name is the last part of its ARN.
                    image_name=row["image_arn"].rsplit(":", 1)[-1],
                    version=row["image_version"],
                    cloudwatch=target,
                    created_at=row["started_at"],
                    finished_at=(row["terminated_at"] or row["started_at"]) if terminated else None,
                )
            )
        return sources
