"""The devcluster's command line, where it refuses before making anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from openmicrovm.devcluster.__main__ import build_parser


def devcluster(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openmicrovm.devcluster", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_up_refuses_a_directory_in_use_and_makes_nothing(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("of the user's")

    done = devcluster("up", "--hosts", "1", "--dir", str(tmp_path))

    assert done.returncode == 1
    assert f"{tmp_path} is not empty" in done.stderr and "down --dir" in done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["something"]


def test_down_without_a_cluster_says_so(tmp_path: Path) -> None:
    done = devcluster("down", "--dir", str(tmp_path))

    assert done.returncode == 1
    assert "there is no cluster.json" in done.stderr


def test_settings_become_openmicrovm_variables() -> None:
    args = build_parser().parse_args(
        ["up", "--dir", "d", "--setting", "min_idle_seconds=1", "--setting", "quota_images=3"]
    )
    assert dict(args.setting) == {"OPENMICROVM_MIN_IDLE_SECONDS": "1", "OPENMICROVM_QUOTA_IMAGES": "3"}
    assert (args.hosts, args.replicas, args.lease_seconds) == (3, 2, 10.0)


def test_a_malformed_setting_is_refused() -> None:
    done = devcluster("up", "--dir", "/nonexistent/d", "--setting", "no-equals-sign")

    assert done.returncode == 2
    assert "is not KEY=VALUE" in done.stderr
