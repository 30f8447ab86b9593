"""OCI runtime specs (config.json) for runsc, and the capability sets of spec §5.8."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .driver import ProcessConfig
from .rootfs import ResolvedUser

# Spec §5.8: what a MicroVM's app gets unless the image asks for additionalOsCapabilities ALL.
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
)

ALL_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
)

# Where the agent binary appears inside every sandbox (bind-mounted read-only).
AGENT_IN_SANDBOX = "/.omv/agent"


def agent_command(listen: str, user: ResolvedUser, process: ProcessConfig, *options: str) -> list[str]:
    """The guest agent's command line in a sandbox: where it listens, any more of its options, and
    the app it starts, as whom and where."""
    return [
        AGENT_IN_SANDBOX,
        "--listen",
        listen,
        *options,
        "--uid",
        str(user.uid),
        "--gid",
        str(user.gid),
        "--groups",
        ",".join(str(g) for g in user.groups),
        "--workdir",
        process.workdir or "/",
        "--",
        *process.argv,
    ]


def capability_set(all_capabilities: bool) -> list[str]:
    return list(ALL_CAPABILITIES if all_capabilities else DEFAULT_CAPABILITIES)


def runsc_spec(
    *,
    rootfs: Path,
    agent_binary: Path,
    args: list[str],
    env: dict[str, str],
    hostname: str,
    all_capabilities: bool,
    netns_path: Path,
    cgroups_path: str,
) -> dict[str, Any]:
    """A spec whose process is the agent (as root; the agent drops to the app's user itself).

    The root is not marked read-only: runsc only layers its in-memory overlay (--overlay2) over a
    writable root, and that overlay is what keeps the image untouched and what a checkpoint carries.
    """
    caps = capability_set(all_capabilities)
    return {
        "ociVersion": "1.0.0",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [f"{key}={value}" for key, value in env.items()],
            "cwd": "/",
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "inheritable": caps,
                "permitted": caps,
            },
            "noNewPrivileges": not all_capabilities,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576}],
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": AGENT_IN_SANDBOX,
                "type": "bind",
                "source": str(agent_binary),
                "options": ["bind", "ro"],
            },
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": str(netns_path)},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
            ],
            "cgroupsPath": cgroups_path,
        },
    }
