"""deploy/openmicrovm.service, the one-host server as a system service: what it starts, where its
data and its users' uploads go, that its sandboxes outlive a restart, and that systemd accepts it.
Nothing here needs systemd running."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from openmicrovm.config import SYSTEM_CONFIG_FILE, load_settings
from tests.deploy.test_deploy_files import (
    AGENT_FORBIDDEN_OPTIONS,
    DEPLOY,
    INSTALLED_PROGRAM,
    PROGRAM,
    check_flags,
    check_variable_names,
    exec_start,
    systemd_analyze,
    unit_options,
)
from tests.support.server import write_settings

UNIT = DEPLOY / "openmicrovm.service"
DATA_DIR = "/var/lib/openmicrovm"
CACHE_DIR = "/var/cache/openmicrovm"
UPLOADS = "/var/lib/openmicrovm-uploads"


def header_settings() -> dict[str, Any]:
    """The settings file the unit's header tells to write: its indented `key = value` lines."""
    lines = [
        match.group(1)
        for line in UNIT.read_text().splitlines()
        if (match := re.fullmatch(r"#\s{5,}(\w+ = .+)", line))
    ]
    assert lines, "the unit's header shows no settings file"
    return tomllib.loads("\n".join(lines))


def test_it_runs_the_one_host_server_on_its_own_data_dir() -> None:
    options = unit_options(UNIT)
    argv = exec_start(UNIT)
    assert argv == [INSTALLED_PROGRAM, "serve", "--data-dir", DATA_DIR], argv
    # systemd makes the data and cache dirs, closed to other users.
    assert options["Service.StateDirectory"] == ["openmicrovm"]
    assert options["Service.StateDirectoryMode"] == ["0700"]
    assert options["Service.CacheDirectory"] == ["openmicrovm"]
    assert options["Service.CacheDirectoryMode"] == ["0700"]
    environment = dict(
        item.split("=", 1) for value in options["Service.Environment"] for item in shlex.split(value)
    )
    assert environment == {"OPENMICROVM_CACHE_DIR": CACHE_DIR}
    check_variable_names(set(environment), UNIT.name)
    assert "Service.User" not in options and "Service.DynamicUser" not in options, "it needs root"


def test_its_sandboxes_outlive_a_restart_and_stay_out_of_its_cgroup() -> None:
    options = unit_options(UNIT)
    assert options["Service.KillMode"] == ["process"]
    assert options["Service.Restart"] == ["on-failure"]
    assert options["Service.OOMPolicy"] == ["continue"]
    assert options["Service.TasksMax"] == ["infinity"]
    assert int(options["Service.LimitNOFILE"][0]) >= 65536
    # Sandboxes go into a scope of their own, not below the unit's cgroup (systemd 252 cannot
    # start a new main process in a delegated cgroup whose controllers are enabled).
    assert "Service.Delegate" not in options
    forbidden = sorted({key.split(".", 1)[1] for key in options} & AGENT_FORBIDDEN_OPTIONS)
    assert not forbidden, f"the unit sets {forbidden}, which the server's sandboxes cannot live with"


def test_the_upload_directory_is_made_sticky_and_unlistable() -> None:
    (pre,) = unit_options(UNIT)["Service.ExecStartPre"]
    argv = shlex.split(pre)
    assert argv[0] == "/usr/bin/install" and argv[-1] == UPLOADS, argv
    assert argv[argv.index("-m") + 1] == "1733"
    assert argv[argv.index("-o") + 1] == argv[argv.index("-g") + 1] == "root"
    assert "-d" in argv


def test_the_settings_file_it_asks_for_matches_the_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header's settings file names the unit's data dir, and lists the upload directory the
    unit makes among the roots the server reads zips from; as the system-wide file, the server
    and every user's CLI read it."""
    assert f"settings in {SYSTEM_CONFIG_FILE}" in UNIT.read_text()
    # A user's default data dir, where a settings.toml would win: one of the test's, empty.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home"))
    system = tmp_path / "openmicrovm.toml"
    write_settings(system, header_settings())
    settings = load_settings(environ={"OPENMICROVM_SYSTEM_CONFIG": str(system)})
    assert settings.data_dir == Path(DATA_DIR)
    assert settings.cache_dir == Path(CACHE_DIR)
    assert settings.effective_artifact_file_roots == (Path(DATA_DIR) / "artifacts", Path(UPLOADS))
    # The server started by the unit reads the same file, its flag naming the same data dir.
    server = load_settings(
        overrides={"data_dir": Path(DATA_DIR)}, environ={"OPENMICROVM_SYSTEM_CONFIG": str(system)}
    )
    assert server.effective_artifact_file_roots == settings.effective_artifact_file_roots


def test_systemd_accepts_it(tmp_path: Path) -> None:
    # systemd-analyze verify wants the ExecStart program to exist: this checkout's stands in.
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(INSTALLED_PROGRAM, str(PROGRAM)))
    result = subprocess.run(
        [systemd_analyze(), "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if copy.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_every_flag_it_passes_exists() -> None:
    check_flags(exec_start(UNIT), UNIT.name)
