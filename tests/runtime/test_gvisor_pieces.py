"""The gvisor driver's mechanisms on their own, without a sandbox: records, the launcher's
markers, runsc's state files, the bundle, snapshot metas of older releases."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from openmicrovm.runtime import ProcessConfig, SandboxSpec
from openmicrovm.runtime.gvisor import bundle, launcher
from openmicrovm.runtime.gvisor.checkpoint import Marker
from openmicrovm.runtime.gvisor.records import GVisorRecord, GVisorSnapshotMeta
from openmicrovm.runtime.gvisor.runsc_commands import Binary, RunscCommands
from openmicrovm.runtime.records import SNAPSHOT_FILE, SandboxRecord, SnapshotMeta, read_snapshot_meta
from openmicrovm.runtime.runsc import Runsc

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the launcher unshares a mount namespace")


def spec(root: Path) -> SandboxSpec:
    return SandboxSpec(
        root, ProcessConfig(argv=["python3", "app.py"], env={"A": "1"}, workdir="/app", user="app")
    )


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "image"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nextra:x:1001:app\n")
    return root


def test_records_of_every_release_read_back_typed_per_driver(image: Path) -> None:
    record = GVisorRecord(
        "microvm-1", "gvisor", spec(image), "0123456789ab", "t" * 32, "/agent", runsc="/r", uplink=3
    )
    text = record.to_json()
    again = GVisorRecord.from_json(text)
    assert again == record and isinstance(again, GVisorRecord)
    # A driver without runsc reads the same file with its own fields only.
    plain = SandboxRecord.from_json(text)
    assert type(plain) is SandboxRecord and not hasattr(plain, "uplink")
    # Records written before records were typed per driver carry every driver's fields, and
    # gvisor records older still lack runsc's: both read back.
    older = json.loads(text)
    del older["runsc"], older["runsc_platform"], older["uplink"]
    assert GVisorRecord.from_json(json.dumps(older)).runsc == ""
    assert GVisorRecord.from_json(json.dumps(older)).uplink == -1


def test_snapshot_metas_read_back_with_the_drivers_own_fields(tmp_path: Path, image: Path) -> None:
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    meta = GVisorSnapshotMeta(
        "gvisor", spec(image), "t" * 32, 10, 20, runsc_version="0.0~2024", runsc_platform="ptrace"
    )
    (snapshot / SNAPSHOT_FILE).write_text(meta.to_json())
    assert read_snapshot_meta(snapshot, "gvisor", GVisorSnapshotMeta) == meta
    assert type(read_snapshot_meta(snapshot, "gvisor")) is SnapshotMeta
    data = json.loads((snapshot / SNAPSHOT_FILE).read_text())
    del data["runsc_version"], data["runsc_platform"]  # made before snapshots recorded them
    (snapshot / SNAPSHOT_FILE).write_text(json.dumps(data))
    assert read_snapshot_meta(snapshot, "gvisor", GVisorSnapshotMeta).runsc_version == ""


def test_the_bundle_starts_the_agent_as_init_with_the_app_after_it(tmp_path: Path, image: Path) -> None:
    directory = bundle.write(
        tmp_path / "bundle",
        spec(image),
        "secret-token",
        Path("/cache/omv-agent"),
        root=tmp_path / "root",
        netns_path=Path("/run/netns/x"),
        cgroups_path="/openmicrovm-x/y",
    )
    config_file = directory / "config.json"
    assert oct(config_file.stat().st_mode & 0o777) == "0o600"  # it holds the agent's secret
    process = json.loads(config_file.read_text())["process"]
    args = process["args"]
    assert args[args.index("--uid") + 1] == "1000" and args[args.index("--groups") + 1] == "1000,1001"
    assert args[args.index("--workdir") + 1] == "/app"
    assert args[args.index("--") + 1 :] == ["python3", "app.py"]
    assert "OMV_AGENT_TOKEN=secret-token" in process["env"] and "A=1" in process["env"]


def test_containers_are_read_from_runscs_state_files_never_from_runsc(tmp_path: Path) -> None:
    fake = Runsc("/nonexistent/runsc", "0.0~20240729.0", frozenset(), ("ptrace",))
    commands = RunscCommands(tmp_path / "runsc", Binary(fake, "ptrace"), tmp_path / "cache")
    (commands.root / "omv-0123456789ab_sandbox:omv-0123456789ab.state").write_text("{}")  # runsc 2024
    (commands.root / "omv-ba9876543210").mkdir()  # older runsc: a directory per container
    (commands.root / "not-ours").mkdir()
    (commands.root / "omv-0123456789ab.lock").write_text("")
    assert commands.containers() == {"omv-0123456789ab", "omv-ba9876543210"}
    argv = commands.argv(commands.default, ["delete", "x"])
    assert argv[:3] == ["/nonexistent/runsc", "--root", str(commands.root)] and "--platform=ptrace" in argv
    assert "--net-disconnect-ok" not in argv  # only for a runsc that has the flag


@needs_root
def test_the_launcher_marks_a_command_done_only_when_it_succeeded(tmp_path: Path) -> None:
    """Crash safety rests on this: the marker exists only after the command exited 0, and its pid
    file names the launcher while the command runs."""
    env = {"PATH": os.environ["PATH"]}
    done = Marker(tmp_path / "checkpoint.done")
    ok = subprocess.run(
        launcher.wrap(["sh", "-c", 'cat "$0"', str(done.pid_file)]),
        env={**env, "OMV_DONE": str(done.path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0 and done.is_set()
    assert ok.stdout.strip().isdigit()  # the launcher's pid was there while the command ran
    done.clear()
    assert not done.is_set() and not done.pid_file.exists()
    failed = subprocess.run(launcher.wrap(["false"]), env={**env, "OMV_DONE": str(done.path)}, timeout=30)
    assert failed.returncode == 1 and not done.is_set()
    # /proc/sys/net is hidden from the command (see launcher.py), and nothing leaks to the host.
    hidden = subprocess.run(
        launcher.wrap(["ls", "/proc/sys/net"]), env=env, capture_output=True, text=True, timeout=30
    )
    assert hidden.returncode == 0 and hidden.stdout.strip() == ""
    assert os.listdir("/proc/sys/net")
