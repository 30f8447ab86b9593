"""The one error the object store package raises for a store or a cache that cannot serve a request.

Callers (the build engine publishing a version, the MicroVM engine fetching one) turn it into a
build failure or a run failure with its text as the reason, so every message says what went wrong
and what an operator can do about it.
"""

from __future__ import annotations


class ObjectStoreError(Exception):
    """The object store or a fetched copy is unreachable, incomplete, corrupt or hostile."""


class ObjectMissing(ObjectStoreError):
    """A key the caller expected is not in the store (a manifest never published, a blob removed)."""
