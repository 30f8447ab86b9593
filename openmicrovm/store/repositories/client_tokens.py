"""clientToken records: the answer an idempotent call gave, kept for the token's lifetime."""

from __future__ import annotations

import json
from typing import Any

from openmicrovm.store.connection import Connection
from openmicrovm.store.records import ClientTokenUse


class ClientTokensRepository:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def forget_before(self, oldest: float) -> None:
        self.connection.execute("DELETE FROM client_tokens WHERE created_at < ?", (oldest,))

    def find(self, account: str, region: str, operation: str, token: str) -> ClientTokenUse | None:
        row = self.connection.one(
            "SELECT fingerprint, response FROM client_tokens "
            "WHERE account = ? AND region = ? AND operation = ? AND token = ?",
            (account, region, operation, token),
        )
        return None if row is None else ClientTokenUse(row["fingerprint"], json.loads(row["response"]))

    def remember(
        self,
        account: str,
        region: str,
        operation: str,
        token: str,
        fingerprint: str,
        response: dict[str, Any],
        now: float,
    ) -> None:
        self.connection.execute(
            "INSERT INTO client_tokens (account, region, operation, token, fingerprint, response, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (account, region, operation, token, fingerprint, json.dumps(response), now),
        )
