"""The real thing on a Debian 12 host with network access to its mirror: the trixie source and
pin exactly as install.sh plans them, on the host's own mirror, with the real archive signatures,
given to an apt whose lists and cache live in a temporary dir (the host's /etc/apt and
/var/lib/apt are not touched); runsc_install then fetches the pinned runsc through it."""

from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path

import pytest

from openmicrovm.runtime import runsc_install
from tests.install.apt_repo import isolated_apt
from tests.install.test_install_sh import apt_mirror_of, run


def reachable(uri: str) -> bool:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    try:
        with socket.create_connection(
            (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), 5
        ):
            return True
    except OSError:
        return False


def test_the_planned_source_fetches_the_pinned_runsc_from_the_hosts_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("runsc_install runs as root")
    mirror = apt_mirror_of("bookworm")
    if mirror is None or not reachable(mirror):
        pytest.skip(f"no network access to this host's Debian bookworm mirror ({mirror})")
    plan = run(tmp_path, "debian12", "--plan")
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "a Debian trixie source on the host's mirror" in line)
    source = [line.strip() for line in lines[start + 1 : start + 6]]
    assert source[0] == "Types: deb" and source[-1].startswith("Signed-By: ")
    pin_start = next(i for i, line in enumerate(lines) if "which pins every trixie package at -1" in line)
    pin = [line.strip() for line in lines[pin_start + 1 : pin_start + 5]]
    apt = isolated_apt(tmp_path / "apt", "\n".join(source) + "\n")
    (apt.preferences / "openmicrovm-trixie").write_text("\n".join(pin) + "\n")
    monkeypatch.setattr(runsc_install, "system_is_pinned", lambda prefix: None)
    installed = runsc_install.install(tmp_path / "cache", apt=apt.apt, source=apt.source)
    assert installed.version.startswith(runsc_install.VERSION_PREFIX)
    assert "ptrace" in installed.platforms and installed.has_flag("net-disconnect-ok")
    policy = apt.apt.run("apt-cache", "policy", "runsc").stdout
    assert "Candidate: (none)" in policy, policy  # the pin: trixie's runsc is never picked by itself
