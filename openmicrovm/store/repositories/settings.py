"""Values the servers of one database share: the schema version, secrets, token keys."""

from __future__ import annotations

from openmicrovm.store.connection import Connection, scalar


class MetaRepository:
    """Named values in the `meta` table (schema_version, service_secret)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def get(self, key: str) -> str | None:
        return scalar(self.connection, "SELECT value FROM meta WHERE key = ?", (key,))

    def put(self, key: str, value: str) -> None:
        self.connection.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def add_if_absent(self, key: str, value: str) -> str:
        """Store `value` unless the key has one; the value that is stored now."""
        self.connection.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value)
        )
        stored = self.get(key)
        assert stored is not None
        return stored


class TokenKeysRepository:
    """The keys that seal endpoint tokens: the newest seals, every one still opens."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def all(self) -> list[tuple[str, bytes, float]]:
        """(key id, key, created at), oldest first."""
        rows = self.connection.all("SELECT kid, secret, created_at FROM token_keys ORDER BY created_at, kid")
        return [(row["kid"], bytes.fromhex(row["secret"]), row["created_at"]) for row in rows]

    def add(self, kid: str, secret: bytes, now: float) -> None:
        self.connection.execute(
            "INSERT INTO token_keys (kid, secret, created_at) VALUES (?, ?, ?)", (kid, secret.hex(), now)
        )
