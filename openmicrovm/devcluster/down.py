"""`down`: stop the cluster of a directory from its cluster.json, when its `up` was killed (or is
stuck, or still runs: it is then asked to stop first, as SIGTERM would). Every step is safe to
repeat and works on what is left, so `down` also finishes a teardown that failed half-way."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from openmicrovm.devcluster import network, postgres, processes, roles, s3
from openmicrovm.devcluster.processes import ManagedProcess, ProcessIdentity
from openmicrovm.devcluster.progress import DevclusterError, say
from openmicrovm.devcluster.state import FILE_NAME, ClusterState

UP_STOP_TIMEOUT_SECONDS = 180.0


def run_down(directory: Path) -> int:
    return asyncio.run(_down(directory))


def _process(name: str, record: dict[str, Any] | None) -> ManagedProcess | None:
    identity = ProcessIdentity.from_json(record or {})
    if identity is None or record is None:
        return None
    return ManagedProcess(name, identity, Path(record.get("log", "/dev/null")))


async def _down(directory: Path) -> int:
    if os.geteuid() != 0:
        raise DevclusterError("stopping a devcluster removes network namespaces and links", "run it as root")
    try:
        state = ClusterState.load(directory)
    except FileNotFoundError:
        raise DevclusterError(
            f"there is no {FILE_NAME} in {directory}", "give the --dir of an `up`"
        ) from None
    except ValueError as error:
        raise DevclusterError(f"cannot read {directory / FILE_NAME}: {error}") from None
    record = state.record
    await _stop_up(record)
    state.update(status="stopping")

    for replica in record.get("replicas", []):
        process = _process(replica["name"], replica)
        if process is not None and process.running():
            say(f"stopping {replica['name']} (pid {process.identity.pid})")
            await roles.stop(process)
    database = _process("PostgreSQL", record.get("postgres"))
    agent_env = roles.with_settings(record.get("environment", {}).get("agent", {}))
    for agent in record.get("agents", []):
        net = network.AgentNetwork(agent["netns"], agent["link"], agent["peer_link"], agent["address"])
        process = _process(agent["name"], agent)
        if process is not None:
            if process.running():
                say(f"stopping {agent['name']} (pid {process.identity.pid})")
            await roles.stop_agent(net, process)
        data_dir = Path(agent["data_dir"])
        if database is not None and database.running() and roles.has_state(data_dir):
            say(f"stopping {agent['name']}'s sandboxes")
            try:
                await roles.cleanup_agent(
                    agent["name"],
                    net,
                    data_dir,
                    agent_env,
                    directory / "logs" / f"{agent['name']}-cleanup.log",
                )
            except DevclusterError as error:
                say(f"could not stop {agent['name']}'s sandboxes: {error}")
    naming = network.Naming(record["id"])
    say(f"removing namespaces and links {naming.netns_prefix}*, {naming.link_prefix}*")
    network.sweep(naming)

    moto = _process("S3 (moto)", record.get("s3"))
    if moto is not None and moto.running():
        say("stopping S3")
        await s3.stop(moto)
    if database is not None and database.running():
        say("stopping PostgreSQL")
        await postgres.stop(database)
    database_record = record.get("postgres") or {}
    if database_record.get("temporary") and Path(database_record["directory"]).exists():
        say(f"removing {database_record['directory']}")
        shutil.rmtree(database_record["directory"], ignore_errors=True)
    state.update(status="stopped")
    return _report_leftovers(record, naming)


async def _stop_up(record: dict[str, Any]) -> None:
    """If the `up` of this cluster still runs, let it take its cluster down (it knows best); kill
    it if it does not manage within UP_STOP_TIMEOUT_SECONDS, and carry on from what is left."""
    up = ProcessIdentity.from_json(record.get("devcluster", {}))
    if up is None or up.pid == os.getpid() or not processes.is_running(up):
        return
    say(f"the devcluster's `up` (pid {up.pid}) still runs: sending it SIGTERM")
    processes.signal_process(up, signal.SIGTERM)
    if await processes.wait_ended(up, UP_STOP_TIMEOUT_SECONDS):
        say("it has stopped; checking nothing is left")
        return
    say(f"it did not stop within {UP_STOP_TIMEOUT_SECONDS:.0f} s: killing it")
    processes.signal_process(up, signal.SIGKILL)
    await processes.wait_ended(up, 10.0)


def _report_leftovers(record: dict[str, Any], naming: network.Naming) -> int:
    named = [
        *(("replica", each) for each in record.get("replicas", [])),
        *(("agent", each) for each in record.get("agents", [])),
        ("PostgreSQL", record.get("postgres")),
        ("S3", record.get("s3")),
    ]
    alive = [
        f"{kind} pid {process.identity.pid}"
        for kind, each in named
        if (process := _process(kind, each)) is not None and process.running()
    ]
    namespaces, links = network.leftovers(naming)
    left = alive + namespaces + links
    if left:
        say(f"still there: {', '.join(left)}; run `down` again, or remove them by hand")
        return 1
    say("stopped; nothing is left")
    return 0
