"""The OCI bundle runsc runs and restores a sandbox from: the guest agent as init, the app after it."""

from __future__ import annotations

import json
from pathlib import Path

from .. import agent_client, oci, rootfs
from ..agent_client import AGENT_PORT
from ..driver import SandboxSpec
from ..records import write_private
from .network import SANDBOX_IP


def write(
    directory: Path,
    spec: SandboxSpec,
    token: str,
    agent_binary: Path,
    *,
    root: Path,
    netns_path: Path,
    cgroups_path: str,
) -> Path:
    """Write directory/config.json; the agent's secret goes in its environment (it keeps it to
    itself and hands the rest to the app). Returns the bundle directory."""
    user = rootfs.resolve_user(spec.rootfs, spec.process.user)
    env = rootfs.app_environment(spec.process, user)
    env["OMV_AGENT_TOKEN"] = token
    config = oci.runsc_spec(
        rootfs=root,
        agent_binary=agent_binary,
        args=oci.agent_command(
            f"{SANDBOX_IP}:{AGENT_PORT}",
            user,
            spec.process,
            "--max-relays",
            str(agent_client.MAX_RELAYED_CONNECTIONS),
        ),
        env=env,
        hostname=spec.hostname,
        all_capabilities=spec.all_capabilities,
        netns_path=netns_path,
        cgroups_path=cgroups_path,
    )
    directory.mkdir(exist_ok=True)
    write_private(directory / "config.json", json.dumps(config, indent=1), durable=False)
    return directory
