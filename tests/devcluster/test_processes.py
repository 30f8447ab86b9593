"""How the devcluster starts, waits for and stops its processes."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from openmicrovm.devcluster import processes, roles
from openmicrovm.devcluster.progress import DevclusterError

READY_AFTER_A_WHILE = """
import sys, time
print("starting", flush=True)
time.sleep(0.5)
print("openmicrovm agent agent-9 listening on http://10.0.0.9:4600", flush=True)
time.sleep(600)
"""

# A process that leaves a child in its group when it is told to stop: stop() must kill the group.
LEAVES_A_CHILD = """
import signal, subprocess, sys, time
child = subprocess.Popen(["sleep", "600"])
print(f"child {child.pid}", flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
time.sleep(600)
"""


def test_a_role_is_ready_at_its_listening_line_and_stops_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    watcher = processes.LogWatcher(log, roles.agent_is_ready)
    process = processes.start("agent-9", [sys.executable, "-c", READY_AFTER_A_WHILE], log_path=log, env={})

    asyncio.run(processes.wait_until(process, watcher, what="ready", timeout=30, hint=""))

    assert watcher.found == "openmicrovm agent agent-9 listening on http://10.0.0.9:4600"
    asyncio.run(processes.stop(process, grace=5))
    assert not process.running() and process.exit_description() == "was killed by SIGTERM"


def test_a_role_that_dies_before_it_is_ready_fails_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "replica.log"
    watcher = processes.LogWatcher(log, roles.replica_is_ready)
    process = processes.start(
        "replica-1",
        [sys.executable, "-c", "import sys; print('cannot reach the database'); sys.exit(3)"],
        log_path=log,
        env={},
    )

    with pytest.raises(DevclusterError) as failure:
        asyncio.run(processes.wait_until(process, watcher, what="ready", timeout=30, hint="see its log"))

    message = str(failure.value)
    assert "replica-1 exited with status 3" in message
    assert "cannot reach the database" in message and message.endswith("see its log")


def test_waiting_gives_up_after_the_timeout(tmp_path: Path) -> None:
    log = tmp_path / "slow.log"
    process = processes.start("slow", ["sleep", "600"], log_path=log, env={})
    try:
        started = time.monotonic()
        with pytest.raises(DevclusterError, match="slow did not get ready within 1 s"):
            asyncio.run(processes.wait_until(process, lambda: False, what="ready", timeout=1, hint=""))
        assert time.monotonic() - started < 10
    finally:
        asyncio.run(processes.stop(process, grace=1))


def test_stop_kills_what_the_process_left_in_its_group(tmp_path: Path) -> None:
    log = tmp_path / "parent.log"
    watcher = processes.LogWatcher(log, lambda line: line.startswith("child "))
    process = processes.start("parent", [sys.executable, "-c", LEAVES_A_CHILD], log_path=log, env={})
    asyncio.run(processes.wait_until(process, watcher, what="its child", timeout=30, hint=""))
    assert watcher.found is not None
    child = processes.identify(int(watcher.found.split()[1]))
    assert child is not None and processes.is_running(child)

    asyncio.run(processes.stop(process, grace=5))

    assert not process.running()
    assert not processes.is_running(child)


def test_a_recycled_pid_is_not_the_process_recorded() -> None:
    own = processes.identify(1)
    assert own is not None
    assert processes.is_running(own)
    assert not processes.is_running(processes.ProcessIdentity(1, own.start_time + 1))


def test_log_lines_never_show_a_database_password(tmp_path: Path) -> None:
    log = tmp_path / "role.log"
    url = "postgresql://postgres:s3cret@10.251.1.1:5432/openmicrovm"
    process = processes.start("role", ["true", "--database-url", url], log_path=log, env={})
    asyncio.run(processes.wait_ended(process, 10))
    assert "s3cret" not in log.read_text() and "postgres:***@10.251.1.1" in log.read_text()
