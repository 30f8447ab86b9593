"""What the store raises: at start (a bad URL, a database it cannot use) and while serving."""

from __future__ import annotations


class StoreError(Exception):
    """The database cannot be used at all: a malformed URL, a newer schema, a refused login.
    Raised at start; the message says what to do."""


class StoreUnavailable(Exception):
    """The database did not answer or the connection broke mid-transaction. Nothing was committed
    (or the commit's outcome is unknown and the caller's compare-and-set makes a retry safe);
    the API answers 503 and the next request tries again."""
