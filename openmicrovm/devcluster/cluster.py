"""`up`: bring a cluster up step by step, run until a signal, then take it down in reverse.

Every step that makes something registers its undo on one AsyncExitStack at once, so that a failed
step, SIGTERM, SIGINT or SIGHUP (at any point, during start-up too) unwinds exactly what exists,
last made first: balancer, replicas, agents (then their sandboxes, then their namespaces), the S3
forwarder, S3, PostgreSQL, the bridge. Each undo reports its own failure and lets the rest run.

The order of start-up follows what each part needs: the bridge address before PostgreSQL (which
listens on it), PostgreSQL and S3 before any role, agents before replicas (so that the endpoint,
once printed, finds hosts to run on). The steps run on one event loop because the forwarder and
the balancer live in this process and must keep relaying while the rest starts and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from openmicrovm.devcluster import network, postgres, processes, roles, s3
from openmicrovm.devcluster.progress import DevclusterError, announce, say
from openmicrovm.devcluster.relay import TcpRelay
from openmicrovm.devcluster.state import ClusterState

WATCH_SECONDS = 1.0


@dataclass(frozen=True)
class UpOptions:
    directory: Path
    hosts: int = 3
    replicas: int = 2
    lease_seconds: float = 10.0
    # OPENMICROVM_<KEY> -> value, for every role (from --setting KEY=VALUE).
    settings: dict[str, str] = field(default_factory=dict)
    subnet: ipaddress.IPv4Network | None = None
    start_timeout: float = 300.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_prerequisites() -> None:
    """Fail before making anything when a tool is missing, saying how to get it."""
    network.check_tools()
    postgres.server_programs()
    s3.check_installed()


def prepare_directory(directory: Path) -> None:
    if directory.exists() and any(directory.iterdir()):
        hint = (
            f"run `python -m openmicrovm.devcluster down --dir {directory}` if a cluster ran there, then "
            "remove it, or give a new --dir"
        )
        raise DevclusterError(f"{directory} is not empty", hint)
    directory.mkdir(parents=True, exist_ok=True)
    # Others may pass through (the postgres account, to its data directory) but not list it;
    # cluster.json and logs/, which hold the database password, are the owner's only.
    directory.chmod(0o711)


def _undo(stack: contextlib.AsyncExitStack, what: str, action: Callable[[], Awaitable[None] | None]) -> None:
    async def guarded() -> None:
        say(what)
        try:
            result = action()
            if result is not None:
                await result
        except Exception as error:
            say(f"could not finish {what}: {error}")

    stack.push_async_callback(guarded)


def run_up(options: UpOptions) -> int:
    return asyncio.run(_up(options))


async def _up(options: UpOptions) -> int:
    check_prerequisites()
    prepare_directory(options.directory)
    own = processes.identify(os.getpid())
    assert own is not None
    state = ClusterState.new(options.directory, secrets.token_hex(3), own.to_json())
    state.save()

    main = asyncio.current_task()
    assert main is not None
    stopping = False

    def on_signal(signum: int) -> None:
        nonlocal stopping
        if stopping:
            say(f"{signal.Signals(signum).name}: already stopping")
            return
        stopping = True
        say(f"{signal.Signals(signum).name}: stopping the cluster")
        main.cancel()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal, signum)
    status = 0
    try:
        async with contextlib.AsyncExitStack() as undo:
            try:
                watched = await _start(options, undo, state)
                await _watch(watched)
            except Exception as error:
                # A bug of ours shows its traceback; either way, the same teardown follows, which a
                # signal no longer interrupts.
                stopping = True
                detail = str(error) if isinstance(error, DevclusterError) else traceback.format_exc()
                say(f"error: {detail}")
                say("stopping what was started")
                state.update(status="failed")
                status = 1
            except asyncio.CancelledError:
                state.update(status="stopping")
                raise
    except asyncio.CancelledError:
        if not stopping:
            raise
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    state.update(status="failed" if status else "stopped")
    say("stopped" if status == 0 else "stopped after the error above")
    return status


async def _start(
    options: UpOptions, undo: contextlib.AsyncExitStack, state: ClusterState
) -> list[processes.ManagedProcess]:
    """Start everything; returns the processes to watch."""
    naming = network.Naming(state.record["id"])
    logs = options.directory / "logs"
    logs.mkdir(mode=0o700)

    # The network first: PostgreSQL and the S3 forwarder listen on the bridge address.
    subnet = network.create_bridge(naming, options.subnet)
    gateway = network.bridge_address(subnet)
    _undo(undo, f"removing bridge {naming.bridge}", lambda: network.sweep(naming))
    state.update(network={"subnet": str(subnet), "bridge": naming.bridge, "bridge_address": gateway})
    say(f"network {subnet}: bridge {naming.bridge} at {gateway}")

    database, database_process = await _start_postgres(options, undo, state, str(subnet), gateway)
    s3_url, s3_process, s3_for_agents = await _start_s3(undo, state, logs, gateway)

    common = {
        **s3.CREDENTIALS,
        # Replicas and agents prove themselves to each other with it.
        "OPENMICROVM_CLUSTER_SECRET": secrets.token_urlsafe(48),
        "OPENMICROVM_SNAPSHOT_STORE_URL": s3.SNAPSHOT_STORE_URL,
        "OPENMICROVM_HOST_LEASE_SECONDS": f"{options.lease_seconds:g}",
        **options.settings,
    }
    replica_env = roles.role_environment(common, database_url=database.url("127.0.0.1"), s3_url=s3_url)
    agent_env = roles.role_environment(common, database_url=database.url(gateway), s3_url=s3_for_agents)
    state.update(environment={"replica": _settings_of(replica_env), "agent": _settings_of(agent_env)})

    agents = await _start_agents(options, undo, state, naming, subnet, agent_env)
    replicas = await _start_replicas(options, undo, state, replica_env)

    balancer = TcpRelay("127.0.0.1", 0, [("127.0.0.1", replica.port) for replica in replicas])
    await balancer.start()
    _undo(undo, "closing the endpoint", balancer.close)
    state.update(endpoint=balancer.url, status="running")

    announce(f"s3 {s3_url}")
    announce(f"artifacts s3://{s3.ARTIFACT_BUCKET}")
    for replica in replicas:
        announce(f"replica {replica.url}")
    for agent in agents:
        announce(
            f"agent {agent.url} name={agent.name} netns={agent.net.netns} link={agent.net.link} "
            f"pid={agent.process.identity.pid}"
        )
    announce(f"state {state.path}")
    announce(f"endpoint {balancer.url}")
    say("running; SIGTERM or Ctrl-C stops it and removes everything it made")
    return [
        database_process,
        s3_process,
        *(agent.process for agent in agents),
        *(replica.process for replica in replicas),
    ]


def _settings_of(environment: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in environment.items() if key.startswith(("OPENMICROVM_", "AWS_"))}


async def _start_postgres(
    options: UpOptions, undo: contextlib.AsyncExitStack, state: ClusterState, subnet: str, gateway: str
) -> tuple[postgres.PostgresServer, processes.ManagedProcess]:
    directory, temporary = postgres.choose_directory(options.directory, state.record["id"])
    if temporary:
        _undo(undo, f"removing {directory}", lambda: shutil.rmtree(directory, ignore_errors=True))
    state.update(postgres={"directory": str(directory), "temporary": temporary})
    say(f"PostgreSQL: creating its data directory in {directory}")
    started = time.monotonic()
    database = await asyncio.to_thread(postgres.initialize, directory, free_port(), subnet)
    process = postgres.start(database, ["127.0.0.1", gateway], options.directory / "logs" / "postgres.log")
    _undo(undo, "stopping PostgreSQL", lambda: postgres.stop(process))
    state.update(
        postgres={
            "directory": str(directory),
            "temporary": temporary,
            "port": database.port,
            "url": database.url("127.0.0.1"),
            "agent_url": database.url(gateway),
            **process.to_json(),
        }
    )
    await postgres.wait_ready(database)
    await postgres.create_database(database)
    say(
        f"PostgreSQL ready on port {database.port} of 127.0.0.1 and {gateway} ({time.monotonic() - started:.1f} s)"
    )
    return database, process


async def _start_s3(
    undo: contextlib.AsyncExitStack, state: ClusterState, logs: Path, gateway: str
) -> tuple[str, processes.ManagedProcess, str]:
    """moto on 127.0.0.1, and a forwarder to it on the bridge address for the agents; returns the
    URL for the host, the process, the URL for the agents."""
    port = free_port()
    process = s3.start(port, logs / "s3.log")
    _undo(undo, "stopping S3", lambda: s3.stop(process))
    url = f"http://127.0.0.1:{port}"
    state.update(s3={"url": url, **process.to_json()})
    await s3.wait_ready(process, port)
    await s3.create_buckets(url, [s3.ARTIFACT_BUCKET, s3.SNAPSHOT_BUCKET])
    forwarder = TcpRelay(gateway, 0, [("127.0.0.1", port)])
    await forwarder.start()
    _undo(undo, "closing the S3 forwarder", forwarder.close)
    state.update(
        s3={
            "url": url,
            "agent_url": forwarder.url,
            "artifact_bucket": s3.ARTIFACT_BUCKET,
            "snapshot_store_url": s3.SNAPSHOT_STORE_URL,
            **process.to_json(),
        }
    )
    say(f"S3 (moto) ready at {url}, for the agents at {forwarder.url}")
    return url, process, forwarder.url


async def _start_agents(
    options: UpOptions,
    undo: contextlib.AsyncExitStack,
    state: ClusterState,
    naming: network.Naming,
    subnet: ipaddress.IPv4Network,
    env: dict[str, str],
) -> list[roles.Agent]:
    agents: list[roles.Agent] = []
    say(f"starting {options.hosts} agent(s) in their namespaces ({subnet})")
    for index in range(1, options.hosts + 1):
        name = f"agent-{index}"
        net = network.add_agent_namespace(naming, index, subnet)
        _undo(
            undo,
            f"removing {name}'s namespace {net.netns}",
            lambda net=net: network.remove_agent_namespace(net),
        )
        data_dir = options.directory / "agents" / name
        data_dir.mkdir(mode=0o700, parents=True)
        cleanup_log = options.directory / "logs" / f"{name}-cleanup.log"
        _undo(
            undo,
            f"stopping {name}'s sandboxes",
            lambda name=name, net=net, data_dir=data_dir, log=cleanup_log: roles.cleanup_agent(
                name, net, data_dir, env, log
            ),
        )
        agent = roles.start_agent(name, net, data_dir, options.directory / "logs" / f"{name}.log", env)
        _undo(undo, f"stopping {name}", lambda agent=agent: roles.stop_agent(agent.net, agent.process))
        agents.append(agent)
        state.update(agents=[each.to_json() for each in agents])
        if index == 1:
            # The first agent alone creates the schema: servers that migrate an empty database at
            # the same moment can fail with "relation ... already exists" (the migration's
            # transaction takes its snapshot before it waits for the migration lock).
            await _wait_all_ready(agents, options.start_timeout)
    await _wait_all_ready(agents[1:], options.start_timeout)
    return agents


async def _start_replicas(
    options: UpOptions, undo: contextlib.AsyncExitStack, state: ClusterState, env: dict[str, str]
) -> list[roles.Replica]:
    replicas: list[roles.Replica] = []
    for index in range(1, options.replicas + 1):
        name = f"replica-{index}"
        data_dir = options.directory / "replicas" / name
        data_dir.mkdir(mode=0o700, parents=True)
        replica = roles.start_replica(
            name, free_port(), data_dir, options.directory / "logs" / f"{name}.log", env
        )
        _undo(undo, f"stopping {name}", lambda replica=replica: roles.stop(replica.process))
        replicas.append(replica)
        state.update(replicas=[each.to_json() for each in replicas])
    say(f"starting {len(replicas)} API replica(s)")
    await _wait_all_ready(replicas, options.start_timeout)
    return replicas


async def _wait_all_ready(members: list[roles.Agent] | list[roles.Replica], timeout: float) -> None:
    started = time.monotonic()

    async def one(member: roles.Agent | roles.Replica) -> None:
        await roles.wait_ready(member, timeout)
        say(f"{member.name} ready at {member.url} ({time.monotonic() - started:.1f} s)")

    # A TaskGroup: the first failure cancels the other waits at once.
    try:
        async with asyncio.TaskGroup() as group:
            for member in members:
                group.create_task(one(member))
    except* DevclusterError as failures:
        raise failures.exceptions[0] from None


async def _watch(watched: list[processes.ManagedProcess]) -> None:
    """Run until cancelled, saying when a process of the cluster ends (tests kill some on purpose;
    a user wants to know)."""
    reported: set[int] = set()
    while True:
        for process in watched:
            if process.identity.pid not in reported and not process.running():
                reported.add(process.identity.pid)
                say(
                    f"{process.name} (pid {process.identity.pid}) {process.exit_description()}; see {process.log_path}"
                )
        await asyncio.sleep(WATCH_SECONDS)
