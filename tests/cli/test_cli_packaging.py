"""Where `deploy` puts its zip when there is no --bucket: a directory the server reads file://
artifacts from, found the way the server finds it, or an error that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from openmicrovm.cli.connection import CliError
from openmicrovm.cli.packaging import artifact_dir
from openmicrovm.config import load_settings


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("OPENMICROVM_ARTIFACT_DIR", "OPENMICROVM_ARTIFACT_FILE_ROOTS", "OPENMICROVM_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENMICROVM_DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


def test_the_default_is_the_servers_default_root(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    chosen = artifact_dir(None)
    assert chosen == tmp_path / "data" / "artifacts"
    # The same directory the server, with the same environment, allows by default.
    assert load_settings().effective_artifact_file_roots == (chosen,)


def test_configured_roots_are_used_and_agree_with_the_server(
    environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "settings.toml").write_text(f'artifact_file_roots = ["{tmp_path}/zips"]\n')
    assert artifact_dir(None) == tmp_path / "zips"
    environment.setenv("OPENMICROVM_ARTIFACT_FILE_ROOTS", f"{tmp_path}/env-zips:{tmp_path}/more")
    assert artifact_dir(None) == tmp_path / "env-zips"
    assert artifact_dir(None) in load_settings().effective_artifact_file_roots


def test_explicit_directories_win(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert artifact_dir(tmp_path / "flag") == tmp_path / "flag"
    environment.setenv("OPENMICROVM_ARTIFACT_DIR", str(tmp_path / "env"))
    assert artifact_dir(None) == tmp_path / "env"


def test_without_a_data_dir_the_error_says_what_to_do(
    environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No silent fallback to a temp dir the server would refuse to read from.
    with pytest.raises(CliError) as caught:
        artifact_dir(None)
    message = str(caught.value)
    assert str(tmp_path / "data") in message
    for hint in ("openmicrovm serve", "--artifact-dir", "artifact_file_roots", "--bucket"):
        assert hint in message, message
