"""A Debian repository of our own on the local disk, and an apt whose state lives in a temporary
dir: the tests run the real apt-get and apt-cache against them, offline, without touching the
host's /etc/apt or /var/lib/apt."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from openmicrovm.runtime.runsc_install import Apt

PINNED = "0.0~20240729.0-4+b7"
NEWER = "0.0~20250101.0-1"
# Answers like runsc 0.0~20240729 does, to --version and to `flags`.
FAKE_RUNSC = """#!/bin/sh
case "$1" in
--version) echo "runsc version 0.0~20240729.0"; echo "spec: 1.2.0" ;;
flags) printf '  -net-disconnect-ok\\n    \\tresets connections\\n  -platform string\\n'
       printf '    \\tspecifies which platform to use: systrap (default), ptrace, kvm. (default "systrap")\\n' ;;
*) exit 1 ;;
esac
"""


def host_arch() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def build_deb(work: Path, version: str, arch: str) -> Path:
    tree = work / f"pkg-{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: runsc\nVersion: {version}\nArchitecture: {arch}\nMaintainer: t <t@example.org>\n"
        "Description: stand-in\n stand-in runsc for tests\n"
    )
    (tree / "usr" / "bin" / "runsc").write_text(FAKE_RUNSC)
    (tree / "usr" / "bin" / "runsc").chmod(0o755)
    deb = work / f"runsc_{version}_{arch}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


@dataclass
class Repo:
    root: Path
    arch: str
    debs: dict[str, Path]  # version -> its file in the pool

    @property
    def uri(self) -> str:
        return f"file:{self.root}"


def make_repo(root: Path, versions: tuple[str, ...] = (PINNED, NEWER), codename: str = "trixie") -> Repo:
    """dists/<codename>/ with an unsigned Release (the sources say Trusted: yes) listing the
    Packages index of main, and a pool with one stand-in runsc .deb per version."""
    arch = host_arch()
    pool = root / "pool" / "main" / "g" / "golang-gvisor-gvisor"
    pool.mkdir(parents=True)
    stanzas, debs = [], {}
    for version in versions:
        deb = build_deb(root.parent / f"build-{root.name}", version, arch)
        target = pool / deb.name
        target.write_bytes(deb.read_bytes())
        data = target.read_bytes()
        debs[version] = target
        stanzas.append(
            f"Package: runsc\nVersion: {version}\nArchitecture: {arch}\nMaintainer: t <t@example.org>\n"
            f"Filename: {target.relative_to(root)}\nSize: {len(data)}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\nDescription: stand-in\n"
        )
    index = "\n".join(stanzas).encode()
    dists = root / "dists" / codename
    (dists / "main" / f"binary-{arch}").mkdir(parents=True)
    (dists / "main" / f"binary-{arch}" / "Packages").write_bytes(index)
    (dists / "Release").write_text(
        f"Origin: Debian\nLabel: Debian\nSuite: stable\nCodename: {codename}\n"
        f"Date: Sat, 09 Aug 2025 00:00:00 UTC\nArchitectures: {arch}\nComponents: main\nSHA256:\n"
        f" {hashlib.sha256(index).hexdigest()} {len(index)} main/binary-{arch}/Packages\n"
    )
    return Repo(root, arch, debs)


def source_text(repo: Repo, codename: str = "trixie") -> str:
    return (
        f"Types: deb\nURIs: {repo.uri}\nSuites: {codename}\nComponents: main\nTrusted: yes\n"
        f"Architectures: {repo.arch}\n"
    )


@dataclass
class IsolatedApt:
    apt: Apt
    source: Path  # the first sources file (install.sh's trixie source in these tests)
    preferences: Path  # a preferences.d of its own


def isolated_apt(base: Path, *sources: str, sandbox_as_root: bool = True) -> IsolatedApt:
    """apt reading only `sources` (as sources.list.d/0.sources, 1.sources, ...) and a
    preferences.d of its own, keeping its lists, cache and (empty) dpkg status under base."""
    for sub in ("lists/partial", "cache/archives/partial", "preferences.d", "sources.list.d"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "status").touch()
    (base / "sources.list").touch()
    for number, text in enumerate(sources):
        (base / "sources.list.d" / f"{number}.sources").write_text(text)
    options = [
        f"Dir::State::Lists={base / 'lists'}",
        f"Dir::Cache={base / 'cache'}",
        f"Dir::State::status={base / 'status'}",
        f"Dir::Etc::sourcelist={base / 'sources.list'}",
        f"Dir::Etc::sourceparts={base / 'sources.list.d'}",
        f"Dir::Etc::preferences={base / 'preferences'}",
        f"Dir::Etc::preferencesparts={base / 'preferences.d'}",
    ]
    if sandbox_as_root:
        # apt's _apt user cannot read pytest's private tmp dirs, where the file: repository is.
        options.append("APT::Sandbox::User=root")
    return IsolatedApt(Apt(tuple(options)), base / "sources.list.d" / "0.sources", base / "preferences.d")
