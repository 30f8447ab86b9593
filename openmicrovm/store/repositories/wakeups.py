"""Wake-ups: a word to the processes listening on a channel, sent when the transaction commits.

PostgreSQL carries them (NOTIFY; Store.listen receives them). On SQLite there is one process,
which acts on its own changes directly, so nothing is sent."""

from __future__ import annotations

from openmicrovm.store.connection import Connection


class WakeupsRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def send(self, channel: str, payload: str) -> None:
        if self.connection.backend == "postgresql":
            self.connection.execute("SELECT pg_notify(?, ?)", (channel, payload))
