"""runsc_install: the whole apt-get update -> apt-cache show -> apt-get download -> extract ->
cache path, run with the real apt against a repository of our own on the local disk (a .deb built
here holding a stand-in runsc), and what it does when it cannot."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest

from openmicrovm.runtime import runsc, runsc_install
from tests.install.apt_repo import (
    FAKE_RUNSC,
    NEWER,
    PINNED,
    IsolatedApt,
    Repo,
    isolated_apt,
    make_repo,
    source_text,
)

pytestmark = [
    pytest.mark.skipif(
        shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None, reason="needs apt"
    ),
]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runsc_install runs as root")


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return make_repo(tmp_path / "repo")


@pytest.fixture
def apt(tmp_path: Path, repo: Repo, monkeypatch: pytest.MonkeyPatch) -> IsolatedApt:
    # A host whose own runsc is not the pinned one (Debian 12), whatever this machine has.
    monkeypatch.setattr(runsc_install, "system_is_pinned", lambda prefix: None)
    return isolated_apt(tmp_path / "apt", source_text(repo))


@needs_root
def test_installs_the_pinned_runsc_into_the_cache_once(apt: IsolatedApt, repo: Repo, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    installed = runsc_install.install(cache, apt=apt.apt, source=apt.source)
    binary = cache / "runsc" / PINNED / "runsc"
    assert installed.path == str(binary) and installed.version == "0.0~20240729.0"  # not NEWER
    assert installed.platforms == ("systrap", "ptrace", "kvm") and installed.has_flag("net-disconnect-ok")
    assert installed.default_platform == "ptrace"
    source = json.loads((cache / "runsc" / PINNED / runsc_install.SOURCE_FILE).read_text())
    assert source["version"] == PINNED and source["fetched_with"] == "apt-get download"
    assert source["url"].startswith("file:") and source["url"].endswith(".deb")
    assert sorted(p.name for p in (cache / "runsc").iterdir()) == [PINNED]  # no temp dirs left
    assert str(binary) in [r.path for r in runsc.installed([cache])]
    # Again: found in the cache, with apt unable to reach anything.
    shutil.rmtree(repo.root)
    again = runsc_install.install(cache, apt=apt.apt, source=apt.source)
    assert again.path == installed.path


@needs_root
def test_apt_refuses_a_package_that_does_not_match_the_index(
    apt: IsolatedApt, repo: Repo, tmp_path: Path
) -> None:
    deb = repo.debs[PINNED]
    deb.write_bytes(deb.read_bytes() + b"tampered")
    cache = tmp_path / "cache"
    with pytest.raises(
        runsc_install.InstallError,
        match=rf"apt-get download runsc={re.escape(PINNED)} failed: .*Hash Sum mismatch",
    ):
        runsc_install.install(cache, apt=apt.apt, source=apt.source)
    assert list((cache / "runsc").iterdir()) == []


@needs_root
def test_the_version_pin_is_kept(apt: IsolatedApt, tmp_path: Path) -> None:
    with pytest.raises(
        runsc_install.InstallError,
        match=rf"apt knows no runsc 0\.0~2099\* \(it has: {re.escape(PINNED)}, {re.escape(NEWER)}\)",
    ):
        runsc_install.install(tmp_path / "cache", apt=apt.apt, source=apt.source, prefix="0.0~2099")
    packages = runsc_install.parse_packages(
        "Package: runsc\nVersion: 0.0~20240729.0-4+b7\nFilename: a\nSize: 1\nSHA256: AA\n\n"
        "Package: runsc\nVersion: 0.0~20240729.0-10\nFilename: b\nSize: 1\nSHA256: bb\n\n"
        "Package: runsc\nVersion: 0.0~20221219.0-2+b3\nStatus: install ok installed\n",  # dpkg's: no file
        "runsc",
    )
    assert [p.version for p in packages] == ["0.0~20240729.0-4+b7", "0.0~20240729.0-10"]
    assert runsc_install.newest(packages, "0.0~20240729.").version == "0.0~20240729.0-10"


@needs_root
def test_only_the_trixie_source_is_refreshed(
    tmp_path: Path, repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No earlier apt-get update: install() updates the one source it is given, and leaves the
    host's other sources (here a bookworm repository) and their indexes alone."""
    monkeypatch.setattr(runsc_install, "system_is_pinned", lambda prefix: None)
    other = make_repo(tmp_path / "other", versions=("0.0~20221219.0-2+b3",), codename="bookworm")
    apt = isolated_apt(tmp_path / "apt", source_text(repo), source_text(other, "bookworm"))
    lists = tmp_path / "apt" / "lists"
    runsc_install.install(tmp_path / "cache", apt=apt.apt, source=apt.source)
    assert any(lists.glob("*_dists_trixie_main_binary-*_Packages*"))
    assert not any(lists.glob("*_dists_bookworm_*"))
    # An index of another source, fetched earlier, is kept (APT::Get::List-Cleanup=0).
    assert apt.apt.run("apt-get", "update").returncode == 0
    assert any(lists.glob("*_dists_bookworm_*"))
    shutil.rmtree(tmp_path / "cache")
    runsc_install.install(tmp_path / "cache", apt=apt.apt, source=apt.source)
    assert any(lists.glob("*_dists_bookworm_*"))


def test_apts_own_runsc_of_the_pinned_version_is_used_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian 13: /usr/bin/runsc is the pinned version; nothing is fetched, apt is not called."""
    system = tmp_path / "usr-bin-runsc"
    system.write_text(FAKE_RUNSC)
    system.chmod(0o755)
    monkeypatch.setattr(runsc, "system_binary", lambda: str(system))
    nowhere = runsc_install.Apt(("Dir::Etc::sourcelist=/nonexistent", "Dir::Etc::sourceparts=-"))
    found = runsc_install.install(tmp_path / "cache", apt=nowhere, source=None)
    assert found.path == str(system)
    assert not (tmp_path / "cache").exists()
    assert runsc_install.system_is_pinned("0.0~2099.") is None


def test_without_apt_access_it_falls_back_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OPENMICROVM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(runsc.ENV_BINARY, raising=False)
    monkeypatch.setattr(runsc_install, "system_is_pinned", lambda prefix: None)
    # A source whose repository is not there: its update fails, and apt then knows no runsc.
    broken = isolated_apt(
        tmp_path / "apt", "Types: deb\nURIs: file:/nonexistent\nSuites: trixie\nComponents: main\n"
    )
    monkeypatch.setattr(runsc_install, "HOST_APT", broken.apt)
    with caplog.at_level(logging.INFO, logger="openmicrovm.runtime.runsc_install"):
        status = runsc_install.main(
            ["--apt-source", str(broken.source), "--record", str(tmp_path / "record")]
        )
    assert status == 0  # install.sh goes on
    if os.geteuid() == 0:
        assert "apt-get update of" in caplog.text and "failed" in caplog.text
        assert "not installed: apt knows no runsc 0.0~20240729.* (it has: none)" in caplog.text
        assert "trixie source that ./install.sh adds" in caplog.text
    if runsc.system_binary() and runsc.probe(runsc.system_binary() or ""):
        assert "falls back to runsc" in caplog.text and "run ./install.sh again" in caplog.text
    else:
        assert "process driver" in caplog.text
    assert not (tmp_path / "cache" / "runsc").exists() or not any((tmp_path / "cache" / "runsc").iterdir())
    assert not (tmp_path / "record").exists()


def test_the_record_names_cache_entries_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    entry = cache / "runsc" / PINNED
    entry.mkdir(parents=True)
    cached = runsc.Runsc(str(entry / "runsc"), "0.0~20240729.0", frozenset(), ("ptrace",))
    record = tmp_path / "state" / "runsc"
    runsc_install.record(record, cached, cache)
    runsc_install.record(record, cached, cache)
    # apt's /usr/bin/runsc is a package, recorded (or not) as one by install.sh.
    runsc_install.record(record, runsc.Runsc("/usr/bin/runsc", "x", frozenset(), ("ptrace",)), cache)
    assert record.read_text() == f"{entry}\n"
