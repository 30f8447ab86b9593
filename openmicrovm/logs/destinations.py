"""Which log streams go to CloudWatch Logs, and under which group and stream names (spec §6.5).

A build ships when its image version's `logging` is `cloudWatch`; a MicroVM when its own run's
`logging` is — the run does not inherit the image's. An empty `cloudWatch {}` takes the names the
live service uses: group `/aws/lambda-microvms/<image name>`, stream `YYYY/MM/DD[<version>]<id>`
(dated by when the build or MicroVM started, in UTC). Without `logging`, nothing leaves the host:
a self-hosted server must not talk to AWS unless asked to.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from openmicrovm.store.db import Database

DEFAULT_GROUP_PREFIX = "/aws/lambda-microvms/"
FINISHED_BUILD_STATES = ("SUCCESSFUL", "FAILED")

_BUILDS = """
    SELECT b.build_id AS id, b.version_number, b.state, b.created_at, b.updated_at AS finished_at,
           i.name, i.region,
           json_extract(v.config, '$.logging.cloudWatch.logGroup') AS log_group,
           json_extract(v.config, '$.logging.cloudWatch.logStream') AS log_stream
    FROM builds b
    JOIN versions v ON v.image_arn = b.image_arn AND v.number = b.version_number
    JOIN images i ON i.arn = b.image_arn
    WHERE json_type(v.config, '$.logging.cloudWatch') IS NOT NULL
"""
_MICROVMS = """
    SELECT id, image_arn, image_version, state, started_at AS created_at, terminated_at AS finished_at,
           region,
           json_extract(config, '$.logging.cloudWatch.logGroup') AS log_group,
           json_extract(config, '$.logging.cloudWatch.logStream') AS log_stream
    FROM microvms
    WHERE json_type(config, '$.logging.cloudWatch') IS NOT NULL
"""


@dataclass(frozen=True)
class LogTarget:
    """One LogStore stream and where in CloudWatch Logs it goes."""

    stream: str  # "builds/<id>" or "microvms/<id>"
    region: str
    log_group: str
    log_stream: str
    # When the build or MicroVM reached its final state (epoch seconds), None while it runs.
    finished_at: float | None


def default_log_stream(started_at: float, version: str, resource_id: str) -> str:
    day = datetime.datetime.fromtimestamp(started_at, datetime.UTC).strftime("%Y/%m/%d")
    return f"{day}[{version}]{resource_id}"


def image_name_of(image_arn: str) -> str:
    return image_arn.rsplit(":", 1)[-1]


def find_targets(db: Database) -> list[LogTarget]:
    targets = []
    for row in db.all(_BUILDS):
        version = f"{row['version_number']}.0"
        finished = row["state"] in FINISHED_BUILD_STATES
        targets.append(
            LogTarget(
                stream=f"builds/{row['id']}",
                region=row["region"],
                log_group=row["log_group"] or DEFAULT_GROUP_PREFIX + row["name"],
                log_stream=row["log_stream"] or default_log_stream(row["created_at"], version, row["id"]),
                finished_at=(row["finished_at"] or row["created_at"]) if finished else None,
            )
        )
    for row in db.all(_MICROVMS):
        # The image may be gone by now; its name is the last part of its ARN.
        name = image_name_of(row["image_arn"])
        targets.append(
            LogTarget(
                stream=f"microvms/{row['id']}",
                region=row["region"],
                log_group=row["log_group"] or DEFAULT_GROUP_PREFIX + name,
                log_stream=row["log_stream"]
                or default_log_stream(row["created_at"], row["image_version"], row["id"]),
                finished_at=(row["finished_at"] or row["created_at"])
                if row["state"] == "TERMINATED"
                else None,
            )
        )
    return targets
