"""What the guest's kernel and the server's data dir show about a MicroVM: its API state, its
sandbox record, and the cgroups, network namespaces and processes named after its sandbox key."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

API = "http://127.0.0.1:4599"
DATA_DIR = Path("/var/lib/openmicrovm")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def api_answers() -> bool:
    try:
        urllib.request.urlopen(f"{API}/2025-09-09/microvms", timeout=5).read()
    except urllib.error.HTTPError:
        return True  # refused, but answered
    return True


def microvm(microvm_id: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{API}/2025-09-09/microvms/{microvm_id}", timeout=10) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def state(microvm_id: str) -> str:
    return str(microvm(microvm_id).get("state"))


def sandbox_dir(microvm_id: str) -> Path | None:
    """The sandbox's state dir (the data dir layout may change; the record names the sandbox)."""
    for record in DATA_DIR.rglob("record.json"):
        if microvm_id in record.parent.name:
            return record.parent
    return None


def sandbox_record(microvm_id: str) -> dict[str, object]:
    directory = sandbox_dir(microvm_id)
    if directory is None:
        raise FileNotFoundError(f"no record.json for {microvm_id} under {DATA_DIR}")
    return json.loads((directory / "record.json").read_text())  # type: ignore[no-any-return]


def cgroups_named(text: str) -> list[Path]:
    found = []
    for directory, subdirectories, _ in os.walk(CGROUP_ROOT):
        for name in subdirectories:
            if text in name:
                found.append(Path(directory) / name)
    return found


def netns_named(text: str) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if text in line]


def processes_naming(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        line = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        if text in line:
            cgroup = read(Path(f"/proc/{pid}/cgroup")).removeprefix("0::")
            found.append(f"{pid} [cgroup {cgroup}] {line[:160]}")
    return found


def read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as error:
        return f"<{error.strerror}>"


def describe_cgroup(path: Path) -> str:
    values = {
        name: read(path / name).replace("\n", "; ")
        for name in (
            "memory.max",
            "memory.current",
            "cpu.max",
            "pids.max",
            "pids.current",
            "cgroup.freeze",
            "cgroup.events",
            "cgroup.subtree_control",
            "cgroup.procs",
        )
    }
    return f"{path}\n" + "\n".join(f"  {name}: {value}" for name, value in values.items())


def main_pid(unit: str = "openmicrovm") -> int:
    output = subprocess.run(
        ["systemctl", "show", "-p", "MainPID", "--value", unit], capture_output=True, text=True
    ).stdout
    return int(output.strip() or 0)


def leftovers(key: str) -> list[str]:
    """Anything on the host still named after a sandbox key."""
    found = [f"cgroup {path}" for path in cgroups_named(key)]
    found += [f"netns {name}" for name in netns_named(key)]
    found += [f"process {line}" for line in processes_naming(key)]
    return found
