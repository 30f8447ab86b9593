"""Starting and stopping the cluster's openmicrovm processes: API replicas on the host, host agents
each inside its own network namespace. Every one gets its settings from the environment (the
caller's OPENMICROVM_* and AWS_* are left out, so that the cluster is the same whatever shell
starts it), and is ready once it prints its `listening` line."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from openmicrovm.devcluster import network, processes
from openmicrovm.devcluster.processes import LogWatcher, ManagedProcess
from openmicrovm.devcluster.progress import DevclusterError

# Each agent has an address of its own, so all can use the same port.
AGENT_PORT = 4600
STOP_GRACE_SECONDS = 30.0


def replica_is_ready(line: str) -> bool:
    return line.startswith("openmicrovm listening on http://")


def agent_is_ready(line: str) -> bool:
    return line.startswith("openmicrovm agent") and "listening" in line


def role_environment(
    common: Mapping[str, str], *, database_url: str, s3_url: str, inherited: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a role: the caller's (PATH, HOME, ...) without its openmicrovm and AWS
    settings, then the cluster's. s3_url is the S3 server as this role reaches it: artifacts
    (AWS_ENDPOINT_URL_S3, read by the builder) and the snapshot store use the same server."""
    return with_settings(
        {
            **common,
            "OPENMICROVM_DATABASE_URL": database_url,
            "OPENMICROVM_SNAPSHOT_STORE_ENDPOINT_URL": s3_url,
            "AWS_ENDPOINT_URL_S3": s3_url,
            # A `cloudWatch` logging configuration then ships to moto too, never to AWS.
            "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": s3_url,
        },
        inherited,
    )


def with_settings(settings: Mapping[str, str], inherited: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without its OPENMICROVM_* and AWS_* variables, plus `settings`."""
    base = os.environ if inherited is None else inherited
    environment = {key: value for key, value in base.items() if not key.startswith(("OPENMICROVM_", "AWS_"))}
    environment.update(settings)
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


@dataclass
class Replica:
    name: str
    port: int
    data_dir: Path
    process: ManagedProcess
    ready: LogWatcher

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "url": self.url, "data_dir": str(self.data_dir), **self.process.to_json()}


@dataclass
class Agent:
    name: str
    net: network.AgentNetwork
    data_dir: Path
    process: ManagedProcess
    ready: LogWatcher

    @property
    def url(self) -> str:
        return f"http://{self.net.address}:{AGENT_PORT}"

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.url,
            "address": self.net.address,
            "netns": self.net.netns,
            "link": self.net.link,
            "peer_link": self.net.peer_link,
            "data_dir": str(self.data_dir),
            **self.process.to_json(),
        }


def start_replica(name: str, port: int, data_dir: Path, log_path: Path, env: Mapping[str, str]) -> Replica:
    command = [
        sys.executable,
        *("-m", "openmicrovm", "serve", "--no-agent"),
        *("--database-url", env["OPENMICROVM_DATABASE_URL"]),
        *("--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)),
    ]
    watcher = LogWatcher(log_path, replica_is_ready)
    return Replica(name, port, data_dir, processes.start(name, command, log_path=log_path, env=env), watcher)


def start_agent(
    name: str, net: network.AgentNetwork, data_dir: Path, log_path: Path, env: Mapping[str, str]
) -> Agent:
    command = [
        *network.enter_command(net.netns),
        sys.executable,
        *("-m", "openmicrovm", "agent"),
        *("--database-url", env["OPENMICROVM_DATABASE_URL"]),
        *("--advertise-url", f"http://{net.address}:{AGENT_PORT}", "--data-dir", str(data_dir)),
    ]
    watcher = LogWatcher(log_path, agent_is_ready)
    return Agent(name, net, data_dir, processes.start(name, command, log_path=log_path, env=env), watcher)


def _failure_hint(process: ManagedProcess, command: str) -> str:
    tail = process.log_tail(60)
    if "invalid choice" in tail or "unrecognized arguments" in tail:
        return (
            f"this openmicrovm lacks the `{command}` the devcluster needs: update it "
            f"(`python -m openmicrovm {command.split()[0]} --help` lists what it has)"
        )
    return f"see {process.log_path}"


async def wait_ready(role: Replica | Agent, timeout: float) -> None:
    command = "serve --no-agent" if isinstance(role, Replica) else "agent"
    await processes.wait_until(
        role.process,
        role.ready,
        what="its `listening` line",
        timeout=timeout,
        hint=_failure_hint(role.process, command),
    )


async def stop(process: ManagedProcess) -> None:
    await processes.stop(process, grace=STOP_GRACE_SECONDS)


def reconnect(net: network.AgentNetwork) -> None:
    """Undo a test's cut of the agent's link: an agent cut off from the database takes its whole
    grace period to stop, and the cleanup of its sandboxes needs the database."""
    with contextlib.suppress(DevclusterError):
        network.run_ip("link", "set", net.link, "up")


async def stop_agent(net: network.AgentNetwork, process: ManagedProcess) -> None:
    reconnect(net)
    await stop(process)


def has_state(data_dir: Path) -> bool:
    """Whether an agent got far enough to write anything (and so perhaps start sandboxes)."""
    return data_dir.exists() and any(data_dir.iterdir())


async def cleanup_agent(
    name: str,
    net: network.AgentNetwork,
    data_dir: Path,
    env: Mapping[str, str],
    log_path: Path,
    timeout: float = 120.0,
) -> None:
    """Stop the sandboxes a stopped agent left (MicroVMs outlive their server on purpose):
    `openmicrovm cleanup` on its data dir, in its namespace, as the agent itself would see things.
    It marks that host's live MicroVMs TERMINATED too: the cluster is going away."""
    if not has_state(data_dir):
        return
    reconnect(net)
    status = await processes.run_to_end(
        f"{name} cleanup",
        [
            *network.enter_command(net.netns),
            sys.executable,
            "-m",
            "openmicrovm",
            "cleanup",
            "--data-dir",
            str(data_dir),
        ],
        log_path=log_path,
        env=env,
        timeout=timeout,
    )
    if status != 0:
        raise DevclusterError(
            f"`openmicrovm cleanup` of {name}'s data dir "
            f"{'took too long' if status is None else f'exited with status {status}'}; "
            f"the end of {log_path}:\n{processes.log_tail(log_path)}"
        )
