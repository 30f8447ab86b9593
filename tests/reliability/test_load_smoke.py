"""A few clients at once cycling MicroVMs (run, get, suspend, resume, terminate) for some seconds:
only throttling or capacity errors, every MicroVM ends TERMINATED with nothing left on the host,
and the server's fds, threads and children are back where they were. `python -m bench.load`
runs 50 clients for minutes and prints latencies."""

from __future__ import annotations

import time

from tests.reliability.invariants import settled_violations
from tests.reliability.loadgen import LOG_FILES_KEPT_OPEN, Load, Sample
from tests.support.server import ServerProcess

CLIENTS = 4
SECONDS = 15


def test_a_short_load_leaves_the_server_as_it_found_it(
    hostile_server: ServerProcess, tenant_image: str
) -> None:
    assert hostile_server.process is not None
    pid = hostile_server.process.pid
    logs = hostile_server.data_dir / "logs"
    before = Sample.of(pid, logs, hostile_server.database_url)
    load = Load(hostile_server, tenant_image, CLIENTS, SECONDS)
    tally = load.run()
    print("\n".join(tally.table()), f"\nerrors: {dict(tally.errors)}", f"\ncycles: {tally.cycles}")
    assert tally.cycles >= CLIENTS, tally.errors
    assert tally.unexpected == {}
    assert load.leftovers() == []
    # Connections and helper processes wind down within seconds; give them up to 20.
    deadline = time.monotonic() + 20
    after = Sample.of(pid, logs, hostile_server.database_url)
    while time.monotonic() < deadline and (after.fds > before.fds + 5 or after.children > before.children):
        time.sleep(0.5)
        after = Sample.of(pid, logs, hostile_server.database_url)
    assert after.fds <= before.fds + 5, (before, after)
    assert after.log_fds <= LOG_FILES_KEPT_OPEN, (before, after)
    assert after.children <= before.children, (before, after)
    assert after.threads <= before.threads + 8, (before, after)
    started = set(load.started_ids)
    assert [
        p
        for p in settled_violations(hostile_server.data_dir, frozenset({pid}))
        if any(i in p for i in started)
    ] == []
