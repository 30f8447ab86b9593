"""Persistence: the only place that knows SQL. SQLite by default, PostgreSQL by URL."""

from openmicrovm.store.errors import StoreError, StoreUnavailable
from openmicrovm.store.schema import MIGRATIONS
from openmicrovm.store.store import Store, Tx, millisecond_clock, schema_version_of

__all__ = [
    "MIGRATIONS",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "Tx",
    "millisecond_clock",
    "schema_version_of",
]
