"""Host agents: their registration, leases (heartbeats), capacity, and the versions they hold."""

from __future__ import annotations

from collections.abc import Callable

from openmicrovm.states import HOST_MOVES, HostState
from openmicrovm.store.connection import Connection, Row
from openmicrovm.store.records import Host
from openmicrovm.store.repositories.moves import move


def _host(row: Row) -> Host:
    return Host(
        id=row["id"],
        advertise_url=row["advertise_url"],
        architecture=row["architecture"],
        state=HostState(row["state"]),
        state_reason=row["state_reason"],
        available_mib=row["available_mib"],
        build_slots=row["build_slots"],
        registered_at=row["registered_at"],
        heartbeat_at=row["heartbeat_at"],
        lease_expires_at=row["lease_expires_at"],
        incarnation=row["incarnation"],
    )


class HostsRepository:
    def __init__(self, connection: Connection, clock: Callable[[], float]) -> None:
        self.connection = connection
        self.clock = clock

    def register(
        self,
        host_id: str,
        advertise_url: str,
        architecture: str,
        available_mib: int,
        build_slots: int,
        lease_seconds: float,
    ) -> Host:
        """An agent starting: ACTIVE with a fresh lease. A host that was LOST comes back as a new
        incarnation (the cluster already ended what it held); an ACTIVE one (a restart within its
        lease) keeps its incarnation and its MicroVMs."""
        now = self.clock()
        row = self.connection.one(
            "INSERT INTO hosts (id, advertise_url, architecture, state, state_reason, available_mib, "
            "build_slots, registered_at, updated_at, heartbeat_at, lease_expires_at, incarnation) "
            "VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, 1) "
            "ON CONFLICT (id) DO UPDATE SET advertise_url = excluded.advertise_url, "
            "architecture = excluded.architecture, available_mib = excluded.available_mib, "
            "build_slots = excluded.build_slots, heartbeat_at = excluded.heartbeat_at, "
            "lease_expires_at = excluded.lease_expires_at, "
            "incarnation = CASE WHEN hosts.state = ? THEN hosts.incarnation ELSE hosts.incarnation + 1 END, "
            "registered_at = CASE WHEN hosts.state = ? THEN hosts.registered_at ELSE excluded.registered_at END "
            "RETURNING *",
            (
                host_id,
                advertise_url,
                architecture,
                HostState.ACTIVE.value,
                available_mib,
                build_slots,
                now,
                now,
                now,
                now + lease_seconds,
                HostState.ACTIVE.value,
                HostState.ACTIVE.value,
            ),
        )
        assert row is not None
        host = _host(row)
        if host.state is HostState.LOST:
            moved = move(
                self.connection,
                "hosts",
                ("id = ?", (host_id,)),
                HOST_MOVES,
                HostState.ACTIVE,
                [HostState.LOST],
                ("updated_at", now),
                None,
            )
            assert moved is not None
            host = _host(moved)
        return host

    def renew(self, host_id: str, incarnation: int, available_mib: int, lease_seconds: float) -> Host | None:
        """A heartbeat: the lease runs on. None when the host is no longer this ACTIVE incarnation
        (the cluster declared it lost): the agent must stop its sandboxes."""
        now = self.clock()
        row = self.connection.one(
            "UPDATE hosts SET heartbeat_at = ?, lease_expires_at = ?, available_mib = ? "
            "WHERE id = ? AND incarnation = ? AND state = ? RETURNING *",
            (now, now + lease_seconds, available_mib, host_id, incarnation, HostState.ACTIVE.value),
        )
        return None if row is None else _host(row)

    def withdraw(self, host_id: str, incarnation: int) -> None:
        """An agent stopping: no new work is placed on it (it says it has no room), while its lease
        runs on so that a restart within it finds its MicroVMs still its own."""
        self.connection.execute(
            "UPDATE hosts SET available_mib = 0 WHERE id = ? AND incarnation = ?", (host_id, incarnation)
        )

    def get(self, host_id: str) -> Host | None:
        row = self.connection.one("SELECT * FROM hosts WHERE id = ?", (host_id,))
        return None if row is None else _host(row)

    def all(self) -> list[Host]:
        return [_host(row) for row in self.connection.all("SELECT * FROM hosts ORDER BY registered_at, id")]

    def active(self, now: float) -> list[Host]:
        """Hosts holding a lease now: where work may be placed."""
        rows = self.connection.all(
            "SELECT * FROM hosts WHERE state = ? AND lease_expires_at > ? ORDER BY id",
            (HostState.ACTIVE.value, now),
        )
        return [_host(row) for row in rows]

    def expired(self, now: float) -> list[Host]:
        """ACTIVE hosts whose lease ran out: lost, unless they renew first."""
        rows = self.connection.all(
            "SELECT * FROM hosts WHERE state = ? AND lease_expires_at <= ? ORDER BY id",
            (HostState.ACTIVE.value, now),
        )
        return [_host(row) for row in rows]

    def mark_lost(self, host: Host, reason: str) -> Host | None:
        """ACTIVE → LOST, if the host is still the incarnation with the lease that expired."""
        row = move(
            self.connection,
            "hosts",
            (
                "id = ? AND incarnation = ? AND lease_expires_at <= ?",
                (host.id, host.incarnation, self.clock()),
            ),
            HOST_MOVES,
            HostState.LOST,
            [HostState.ACTIVE],
            ("updated_at", self.clock()),
            reason,
        )
        return None if row is None else _host(row)

    # -- which versions' outputs each host holds ---------------------------------------------------
    def add_version(self, host_id: str, image_arn: str, version_number: int) -> None:
        self.connection.execute(
            "INSERT INTO host_versions (host_id, image_arn, version_number) VALUES (?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (host_id, image_arn, version_number),
        )

    def drop_version(self, host_id: str, image_arn: str, version_number: int) -> None:
        self.connection.execute(
            "DELETE FROM host_versions WHERE host_id = ? AND image_arn = ? AND version_number = ?",
            (host_id, image_arn, version_number),
        )

    def holding(self, image_arn: str, version_number: int) -> set[str]:
        rows = self.connection.all(
            "SELECT host_id FROM host_versions WHERE image_arn = ? AND version_number = ?",
            (image_arn, version_number),
        )
        return {row["host_id"] for row in rows}

    def forget(self, host_id: str) -> None:
        """A lost host's disk is no longer counted on."""
        self.connection.execute("DELETE FROM host_versions WHERE host_id = ?", (host_id,))


class LeasesRepository:
    """Named leases: work that one process of the cluster does for all, one holder at a time."""

    def __init__(self, connection: Connection, clock: Callable[[], float]) -> None:
        self.connection = connection
        self.clock = clock

    def acquire(self, name: str, holder: str, seconds: float) -> bool:
        """Take or renew the lease: True when `holder` holds it for the next `seconds`."""
        now = self.clock()
        row = self.connection.one(
            "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
            "WHERE leases.holder = excluded.holder OR leases.expires_at <= ? RETURNING holder",
            (name, holder, now + seconds, now),
        )
        return row is not None

    def release(self, name: str, holder: str) -> None:
        self.connection.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))
