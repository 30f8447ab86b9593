"""`openmicrovm doctor`'s cgroup line: which layout it found and who owns the tree (delegation).

The real layouts are met elsewhere: this machine's v1 hybrid by every sandbox test, a systemd
cgroup v2 Debian by tests/hosts/vm-smoke. Here each layout is a made-up tree, so that every
branch of the check is tried on any host.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from openmicrovm.cli import host_checks
from openmicrovm.runtime import cgroup_scope, cgroups


def _v2_tree(tmp_path: Path, controllers: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {root} cgroup2 rw,nsdelegate 0 0\n")
    return root, mounts


def _systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, running: bool) -> None:
    marker = tmp_path / "run-systemd-system"
    if running:
        marker.mkdir()
    monkeypatch.setattr(cgroup_scope, "SYSTEMD_RUNTIME_DIR", marker)


def test_v2_under_systemd_says_delegated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, mounts = _v2_tree(tmp_path, "cpuset cpu io memory pids")
    _systemd(monkeypatch, tmp_path, running=True)
    monkeypatch.setattr(host_checks.shutil, "which", lambda name: f"/usr/bin/{name}")
    check = host_checks.cgroup_check(root, mounts)
    assert check.status == host_checks.OK
    assert (
        "v2 (unified)" in check.detail and "delegated" in check.detail and "not delegated" not in check.detail
    )
    assert "openmicrovm.slice" in check.detail


def test_v2_under_systemd_without_systemd_run_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, mounts = _v2_tree(tmp_path, "cpu memory pids")
    _systemd(monkeypatch, tmp_path, running=True)
    monkeypatch.setattr(host_checks.shutil, "which", lambda name: None)
    check = host_checks.cgroup_check(root, mounts)
    assert check.status == host_checks.FAIL and "systemd-run" in check.detail


def test_v2_without_systemd_is_not_delegated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, mounts = _v2_tree(tmp_path, "cpu memory pids")
    _systemd(monkeypatch, tmp_path, running=False)
    check = host_checks.cgroup_check(root, mounts)
    assert check.status == host_checks.OK and "not delegated" in check.detail


def test_v2_missing_a_controller_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, mounts = _v2_tree(tmp_path, "memory pids")
    _systemd(monkeypatch, tmp_path, running=True)
    check = host_checks.cgroup_check(root, mounts)
    assert check.status == host_checks.FAIL and "missing controllers: cpu" in check.detail


def test_v1_hybrid_names_its_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cgroup"
    mounts = tmp_path / "mounts"
    lines = [f"cgroup2 {root}/unified cgroup2 rw 0 0"]
    lines += [f"cgroup {root}/{c} cgroup rw,{c} 0 0" for c in ("memory", "cpu,cpuacct", "pids", "freezer")]
    mounts.write_text("\n".join(lines) + "\n")
    _systemd(monkeypatch, tmp_path, running=False)
    check = host_checks.cgroup_check(root, mounts)
    assert check.status == host_checks.OK
    assert "v1 (hybrid" in check.detail and "not delegated" in check.detail


def test_the_scope_is_used_only_where_systemd_owns_a_v2_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = _v2_tree(tmp_path, "cpu memory pids")
    _systemd(monkeypatch, tmp_path, running=False)
    assert cgroup_scope.for_host(root, "1a2b3c4d") is None
    _systemd(monkeypatch, tmp_path, running=True)
    scope = cgroup_scope.for_host(root, "1a2b3c4d")
    assert scope is not None and scope.relative == "openmicrovm.slice/openmicrovm-1a2b3c4d.scope"
    # A sandbox's cgroup and the path runtimes are given both lie below the scope.
    layout = cgroups.Layout(2, {"unified": root}, base=scope.relative)
    cgroup = cgroups.Cgroup(layout, "openmicrovm-1a2b3c4d/k1")
    assert cgroup.path == "/openmicrovm.slice/openmicrovm-1a2b3c4d.scope/openmicrovm-1a2b3c4d/k1"
    assert cgroup.procs_files() == [
        root / "openmicrovm.slice/openmicrovm-1a2b3c4d.scope/openmicrovm-1a2b3c4d/k1/cgroup.procs"
    ]
