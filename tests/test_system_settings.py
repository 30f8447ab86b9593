"""The system-wide settings file, /etc/openmicrovm/openmicrovm.toml: read by the server and by
every user's CLI when no other settings file is given or found, and never over one that is."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from openmicrovm import config
from openmicrovm.config import load_settings, system_config_file
from tests.support import unprivileged


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    # The default data dir follows the process's own environment: one of the test's, whatever
    # root's home holds.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home"))
    system = tmp_path / "etc" / "openmicrovm.toml"
    system.parent.mkdir()
    system.write_text(
        f'data_dir = "{tmp_path}/system-data"\nport = 4700\nartifact_file_roots = ["{tmp_path}/uploads"]\n'
    )
    data = tmp_path / "data"
    data.mkdir()
    return {"system": system, "data": data, "home": tmp_path / "home"}


def environ(places: dict[str, Path], **more: str) -> dict[str, str]:
    """The environment load_settings reads: the system file moved to the test's temp dir."""
    return {"OPENMICROVM_SYSTEM_CONFIG": str(places["system"]), **more}


def test_the_system_file_is_the_last_fallback(places: dict[str, Path], tmp_path: Path) -> None:
    settings = load_settings(environ=environ(places))
    assert settings.port == 4700
    # Its data dir counts: a local user's CLI learns the service's data dir from it.
    assert settings.data_dir == tmp_path / "system-data"
    assert settings.effective_artifact_file_roots == (tmp_path / "uploads",)
    # With a data dir of one's own but no settings.toml in it, still the system file.
    assert load_settings(environ=environ(places, OPENMICROVM_DATA_DIR=str(places["data"]))).port == 4700


def test_every_other_settings_file_wins_over_it(places: dict[str, Path], tmp_path: Path) -> None:
    own = places["data"] / "settings.toml"
    own.write_text("port = 4800\n")
    env = environ(places, OPENMICROVM_DATA_DIR=str(places["data"]))
    # Only one settings file is read: nothing of the system file's is mixed in.
    settings = load_settings(environ=env)
    assert (settings.port, settings.data_dir, settings.artifact_file_roots) == (4800, places["data"], ())
    named = tmp_path / "named.toml"
    named.write_text("port = 4900\n")
    assert load_settings(environ={**env, "OPENMICROVM_CONFIG": str(named)}).port == 4900
    flag = tmp_path / "flag.toml"
    flag.write_text("port = 5000\n")
    assert load_settings(flag, environ={**env, "OPENMICROVM_CONFIG": str(named)}).port == 5000


def test_environment_and_flags_still_win_over_its_keys(places: dict[str, Path], tmp_path: Path) -> None:
    env = environ(
        places, OPENMICROVM_PORT="4801", OPENMICROVM_ARTIFACT_FILE_ROOTS=f"{tmp_path}/a:{tmp_path}/b"
    )
    settings = load_settings(environ=env)
    assert settings.port == 4801
    assert settings.artifact_file_roots == (tmp_path / "a", tmp_path / "b")
    assert settings.data_dir == tmp_path / "system-data"
    assert load_settings(overrides={"port": 4802, "data_dir": tmp_path / "flag"}, environ=env).port == 4802
    assert load_settings(overrides={"data_dir": tmp_path / "flag"}, environ=env).data_dir == tmp_path / "flag"


def test_no_system_file_means_the_defaults(places: dict[str, Path]) -> None:
    places["system"].unlink()
    settings = load_settings(environ=environ(places))
    assert settings.port == 4599
    assert settings.data_dir == places["home"] / "openmicrovm"


def test_its_place_is_etc_unless_tests_move_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.SYSTEM_CONFIG_FILE == Path("/etc/openmicrovm/openmicrovm.toml")
    assert system_config_file({}) == config.SYSTEM_CONFIG_FILE
    assert system_config_file({"OPENMICROVM_SYSTEM_CONFIG": "/x.toml"}) == Path("/x.toml")
    monkeypatch.setattr(config, "SYSTEM_CONFIG_FILE", Path("/elsewhere.toml"))
    assert system_config_file({}) == Path("/elsewhere.toml")


def test_a_broken_system_file_is_named(places: dict[str, Path]) -> None:
    places["system"].write_text("port = \n")
    with pytest.raises(ValueError, match=f"{places['system']} is not valid TOML"):
        load_settings(environ=environ(places))
    places["system"].write_text("no_such_key = 1\n")
    with pytest.raises(ValueError, match="unknown setting 'no_such_key'"):
        load_settings(environ=environ(places))


# ------------------------------------------------------------------ as a user other than root

PROBE = (
    "from openmicrovm.config import load_settings\n"
    "try:\n"
    "    s = load_settings()\n"
    "    print('port', s.port, s.data_dir)\n"
    "except ValueError as error:\n"
    "    print('error', error)\n"
)


def probe(env: dict[str, str]) -> str:
    result = unprivileged.run([sys.executable, "-c", PROBE], unprivileged.environment(env))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_user_reads_the_system_file_past_a_data_dir_closed_to_them() -> None:
    """A local user pointed at the service's data dir (0700, root's) cannot tell whether it holds a
    settings.toml: the system file is read, not a PermissionError raised."""
    unprivileged.require_root()
    with unprivileged.reachable_dir() as top:
        service_data = top / "data"
        service_data.mkdir(mode=0o700)
        (service_data / "settings.toml").write_text("port = 1\n")
        system = top / "openmicrovm.toml"
        system.write_text(f'data_dir = "{service_data}"\nport = 4711\n')
        system.chmod(0o644)
        env = {"OPENMICROVM_SYSTEM_CONFIG": str(system), "OPENMICROVM_DATA_DIR": str(service_data)}
        assert probe(env) == f"port 4711 {service_data}"
        # Without the variable the same: the user's own (absent) data dir, then the system file.
        assert probe({"OPENMICROVM_SYSTEM_CONFIG": str(system)}) == f"port 4711 {service_data}"


def test_a_system_file_a_user_cannot_read_says_what_to_do() -> None:
    unprivileged.require_root()
    with unprivileged.reachable_dir() as top:
        system = top / "openmicrovm.toml"
        system.write_text("port = 4712\n")
        system.chmod(0o600)
        answer = probe({"OPENMICROVM_SYSTEM_CONFIG": str(system)})
        assert answer.startswith(f"error settings file {system} cannot be read by this user"), answer
        assert f"chmod 0644 {system}" in answer and "OPENMICROVM_CONFIG" in answer
        # Its directory closed too: the same answer, not "does not exist".
        closed = top / "closed"
        closed.mkdir(mode=0o700)
        hidden = closed / "openmicrovm.toml"
        hidden.write_text("port = 4713\n")
        answer = probe({"OPENMICROVM_SYSTEM_CONFIG": str(hidden)})
        assert answer.startswith(f"error settings file {hidden} cannot be read by this user"), answer
        assert os.path.exists(hidden)
