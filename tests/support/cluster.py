"""A cluster on one machine for the tests: API replicas that hold no sandboxes (`serve --no-agent`)
and host agents (`openmicrovm agent`), real processes on one PostgreSQL database.

To a test it looks like one server (the first replica): `port`, `url`, `client()`, `settings`,
`restart()` and `stop()` act on the whole cluster."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

from tests.support.server import ServerProcess

# Short leases, so that the tests see a lost host within seconds; not for production use.
TEST_LEASE_SECONDS = 3.0


class ClusterUnderTest:
    def __init__(
        self,
        base_dir: Path,
        database_url: str,
        settings: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        hosts: int = 2,
        replicas: int = 1,
    ) -> None:
        self.settings: dict[str, Any] = {"host_lease_seconds": TEST_LEASE_SECONDS, **(settings or {})}
        self.replicas = [
            ServerProcess(base_dir / f"replica{n}", self.settings, env, database_url, args=["--no-agent"])
            for n in range(replicas)
        ]
        self.agents = [
            ServerProcess(base_dir / f"agent{n}", self.settings, env, database_url, role="agent")
            for n in range(hosts)
        ]
        # The processes read their settings file at start: they all share this one dict.
        for process in (*self.replicas, *self.agents):
            process.settings = self.settings
        self.settings["database_url"] = database_url

    @property
    def main(self) -> ServerProcess:
        return self.replicas[0]

    @property
    def process(self) -> Any:
        """The first replica's process: where endpoint traffic enters the cluster."""
        return self.main.process

    @property
    def port(self) -> int:
        return self.main.port

    @property
    def url(self) -> str:
        return self.main.url

    @property
    def data_dir(self) -> Path:
        return self.main.data_dir

    @property
    def database_url(self) -> str:
        return str(self.settings["database_url"])

    def client(self, *args: Any, **kwargs: Any) -> Any:
        return self.main.client(*args, **kwargs)

    def log(self) -> str:
        return "\n".join(f"==> {p.data_dir.name}\n{p.log()}" for p in (*self.replicas, *self.agents))

    def start(self) -> None:
        for agent in self.agents:
            agent.start()
        self.wait_hosts(len(self.agents))
        for replica in self.replicas:
            replica.start()

    def stop(self, cleanup: bool = True) -> None:
        """Stop every process at once (replicas hold no sandboxes: only agents need a cleanup)."""
        with concurrent.futures.ThreadPoolExecutor(len(self.replicas) + len(self.agents)) as pool:
            stops = [pool.submit(replica.stop, cleanup=False) for replica in self.replicas]
            stops += [pool.submit(agent.stop, cleanup=cleanup) for agent in self.agents]
        errors = [stop.exception() for stop in stops if stop.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]

    def restart(self) -> None:
        self.stop(cleanup=False)
        self.start()

    def kill(self) -> None:
        for process in (*self.replicas, *self.agents):
            process.kill()

    def agent_of(self, microvm_id: str) -> ServerProcess:
        """The agent holding a MicroVM, by the host id in its data dir."""
        return self._agent_with(self._host_of("SELECT host_id FROM microvms WHERE id = %s", microvm_id))

    def agent_of_build(self, build_id: str) -> ServerProcess:
        """The agent that ran a build."""
        return self._agent_with(self._host_of("SELECT host_id FROM builds WHERE build_id = %s", build_id))

    def _host_of(self, query: str, key: str) -> str:
        import psycopg

        with psycopg.connect(self.database_url) as connection:
            row = connection.execute(query, (key,)).fetchone()
        assert row is not None and row[0], f"{key} is on no host"
        return str(row[0])

    def _agent_with(self, host_id: str) -> ServerProcess:
        for agent in self.agents:
            if (agent.data_dir / "host-id").read_text().strip() == host_id:
                return agent
        raise AssertionError(f"{host_id} is none of this cluster's agents")

    def wait_hosts(self, count: int, timeout: float = 30.0) -> None:
        """Until `count` hosts hold a lease (agents register before their port answers, but a
        replica may look before the first heartbeat)."""
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with psycopg.connect(self.database_url) as connection:
                active = connection.execute(
                    "SELECT COUNT(*) FROM hosts WHERE state = 'ACTIVE' AND lease_expires_at > "
                    "EXTRACT(EPOCH FROM clock_timestamp())"
                ).fetchone()
            if active is not None and active[0] >= count:
                return
            time.sleep(0.1)
        raise AssertionError(f"fewer than {count} hosts became active within {timeout:g} s:\n{self.log()}")
