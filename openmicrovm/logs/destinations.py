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

from openmicrovm.store import Store

DEFAULT_GROUP_PREFIX = "/aws/lambda-microvms/"


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


def find_targets(store: Store) -> list[LogTarget]:
    return [
        LogTarget(
            stream=source.stream,
            region=source.region,
            log_group=source.cloudwatch.get("logGroup") or DEFAULT_GROUP_PREFIX + source.image_name,
            log_stream=source.cloudwatch.get("logStream")
            or default_log_stream(source.created_at, source.version, source.resource_id),
            finished_at=source.finished_at,
        )
        for source in store.read(lambda tx: tx.log_sources.all())
    ]
