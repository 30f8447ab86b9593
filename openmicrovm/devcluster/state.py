"""D/cluster.json: what a cluster is made of, for tests (pids to kill, links to take down, URLs)
and for `down` (what to stop when `up` was killed). It is rewritten after every step, so that it
names whatever exists even when `up` dies half-way, and kept after the cluster stops (its logs'
paths stay useful). It holds the database password and the cluster secret: owner-only (0600)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILE_NAME = "cluster.json"
FORMAT = 1


class ClusterState:
    def __init__(self, directory: Path, record: dict[str, Any]) -> None:
        self.directory = directory
        self.record = record

    @property
    def path(self) -> Path:
        return self.directory / FILE_NAME

    @classmethod
    def new(cls, directory: Path, cluster_id: str, devcluster: dict[str, int]) -> ClusterState:
        return cls(
            directory,
            {
                "format": FORMAT,
                "id": cluster_id,
                "status": "starting",
                "dir": str(directory),
                "devcluster": devcluster,
                "agents": [],
                "replicas": [],
            },
        )

    @classmethod
    def load(cls, directory: Path) -> ClusterState:
        path = directory / FILE_NAME
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT:
            raise ValueError(f"{path} is of format {record.get('format')!r}; this devcluster reads {FORMAT}")
        return cls(directory, record)

    def update(self, **fields: Any) -> None:
        self.record.update(fields)
        self.save()

    def save(self) -> None:
        # Written aside, then renamed: a reader (or a `down` after a kill) never sees half a file.
        partial = self.path.with_name(f".{FILE_NAME}.partial")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(self.record, file, indent=2)
            file.write("\n")
        os.replace(partial, self.path)
