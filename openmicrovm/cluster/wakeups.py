"""The wake-up channels and messages between replicas and host agents (carried by PostgreSQL).

A wake-up only says "look": the receiver reads what to do from the database, so a lost or
repeated one does no harm (agents also sweep for work now and then)."""

from __future__ import annotations

# Every agent listens here: builds waiting for a host, build outputs to forget.
ALL_HOSTS = "omv_hosts"
BUILDS_WAITING = "builds"
FORGET_BUILDS = "forget-builds"
# One agent listens here: a MicroVM placed on it has something to do.
MICROVM = "microvm"


def host_channel(host_id: str) -> str:
    return f"omv_{host_id}"


def message(kind: str, *words: str) -> str:
    return " ".join((kind, *words))


def parse(payload: str) -> tuple[str, list[str]]:
    kind, *words = payload.split()
    return kind, words
