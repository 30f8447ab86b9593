"""runsc_install: the whole download -> verify -> extract -> cache path against a mirror of our own
on 127.0.0.1 (a .deb built here holding a stand-in runsc), and what it does when it cannot."""

from __future__ import annotations

import hashlib
import http.server
import logging
import lzma
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from openmicrovm.runtime import runsc, runsc_install

VERSION = "0.0~20240729.0-4+b7"
ARCH = "amd64"
FAKE_RUNSC = """#!/bin/sh
case "$1" in
--version) echo "runsc version 0.0~20240729.0"; echo "spec: 1.2.0" ;;
flags) printf '  -net-disconnect-ok\\n    \\tresets connections\\n  -platform string\\n'
       printf '    \\tspecifies which platform to use: systrap (default), ptrace, kvm. (default "systrap")\\n' ;;
*) exit 1 ;;
esac
"""


@dataclass
class Mirror:
    url: str
    root: Path
    release: str
    deb_sha256: str


def build_deb(work: Path, version: str) -> Path:
    tree = work / f"pkg-{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: runsc\nVersion: {version}\nArchitecture: {ARCH}\nMaintainer: t <t@example.org>\n"
        "Description: stand-in\n stand-in runsc for tests\n"
    )
    (tree / "usr" / "bin" / "runsc").write_text(FAKE_RUNSC)
    (tree / "usr" / "bin" / "runsc").chmod(0o755)
    deb = work / f"runsc_{version}_{ARCH}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


def stanza(version: str, filename: str, data: bytes) -> str:
    return (
        f"Package: runsc\nVersion: {version}\nArchitecture: {ARCH}\nFilename: {filename}\n"
        f"Size: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n"
    )


def make_mirror(root: Path, *, tamper: bool = False) -> tuple[str, str]:
    """A trixie tree under root: Packages.xz listing the pinned runsc (plus one newer and one
    unrelated package), and the Release text that InRelease would carry."""
    work = root.parent / "build"
    work.mkdir(exist_ok=True)
    deb = build_deb(work, VERSION)
    pool = root / "pool" / "main" / "g" / "golang-gvisor-gvisor"
    pool.mkdir(parents=True)
    data = deb.read_bytes()
    filename = f"pool/main/g/golang-gvisor-gvisor/{deb.name}"
    (root / filename).write_bytes(data + (b"tampered" if tamper else b""))
    index = "\n".join(
        [
            "Package: runsc-doc\nVersion: 1\nFilename: pool/x.deb\nSize: 1\nSHA256: 00\n",
            stanza(VERSION, filename, data),
            stanza("0.0~20250101.0-1", "pool/main/g/golang-gvisor-gvisor/newer.deb", b"newer"),
        ]
    )
    packed = lzma.compress(index.encode())
    dists = root / "dists" / "trixie" / "main" / f"binary-{ARCH}"
    dists.mkdir(parents=True)
    (dists / "Packages.xz").write_bytes(packed)
    (root / "dists" / "trixie" / "InRelease").write_text("signed by nobody\n")
    release = (
        "Origin: Debian\nCodename: trixie\nMD5Sum:\n 00 1 main/binary-amd64/Packages.xz\nSHA256:\n"
        f" {hashlib.sha256(packed).hexdigest()} {len(packed)} main/binary-{ARCH}/Packages.xz\n"
    )
    return release, hashlib.sha256(data).hexdigest()


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mirror]:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is needed to build a test package")
    root = tmp_path / "mirror"
    root.mkdir()
    release, deb_sha256 = make_mirror(root)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # The signature check itself is tested below on its own: our Release is signed by no one.
    monkeypatch.setattr(runsc_install, "verified_release", lambda signed: release)
    monkeypatch.setattr(runsc_install, "_arch", lambda: ARCH)
    try:
        yield Mirror(f"http://127.0.0.1:{server.server_address[1]}", root, release, deb_sha256)
    finally:
        server.shutdown()
        server.server_close()


def test_installs_the_pinned_runsc_into_the_cache_once(mirror: Mirror, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    installed = runsc_install.install(cache, mirror=mirror.url)
    binary = cache / "runsc" / VERSION / "runsc"
    assert installed.path == str(binary) and installed.version == "0.0~20240729.0"
    assert installed.platforms == ("systrap", "ptrace", "kvm") and installed.has_flag("net-disconnect-ok")
    assert installed.default_platform == "ptrace"
    source = (cache / "runsc" / VERSION / runsc_install.SOURCE_FILE).read_text()
    assert mirror.deb_sha256 in source
    assert sorted(p.name for p in (cache / "runsc").iterdir()) == [VERSION]  # no temp dirs left
    assert str(binary) in [r.path for r in runsc.installed([cache])]
    # Again: found in the cache, with no mirror at all.
    again = runsc_install.install(cache, mirror="http://127.0.0.1:9")
    assert again.path == installed.path


def test_a_package_that_does_not_match_the_index_is_refused(
    mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deb = next((mirror.root / "pool").rglob("*.deb"))
    deb.write_bytes(deb.read_bytes() + b"tampered")
    cache = tmp_path / "cache"
    with pytest.raises(runsc_install.InstallError, match="does not match the SHA256"):
        runsc_install.install(cache, mirror=mirror.url)
    assert list((cache / "runsc").iterdir()) == []
    index = mirror.root / "dists" / "trixie" / "main" / f"binary-{ARCH}" / "Packages.xz"
    index.write_bytes(index.read_bytes() + b"\0")
    with pytest.raises(
        runsc_install.InstallError, match="does not match the checksum in the signed InRelease"
    ):
        runsc_install.install(cache, mirror=mirror.url)


def test_the_version_pin_is_kept(mirror: Mirror, tmp_path: Path) -> None:
    with pytest.raises(
        runsc_install.InstallError, match=r"no runsc 0\.0~2099.*it has: 0\.0~20240729\.0-4\+b7, 0\.0~20250101"
    ):
        runsc_install.install(tmp_path / "cache", mirror=mirror.url, prefix="0.0~2099")
    packages = runsc_install.parse_packages(
        stanza("0.0~20240729.0-4+b7", "a", b"") + "\n" + stanza("0.0~20240729.0-10", "b", b""), "runsc"
    )
    assert runsc_install.newest(packages, "0.0~20240729.").version == "0.0~20240729.0-10"


def test_an_unsigned_release_is_refused() -> None:
    if shutil.which("gpgv") is None or not runsc_install.KEYRING.is_file():
        pytest.skip("gpgv and Debian's archive keyring are needed")
    with pytest.raises(runsc_install.InstallError, match="does not verify"):
        runsc_install.verified_release(b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nOrigin: x\n")


def test_without_a_mirror_it_falls_back_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OPENMICROVM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENMICROVM_DEBIAN_MIRROR", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(runsc.ENV_BINARY, raising=False)
    monkeypatch.setattr(runsc_install, "ATTEMPTS", 1)
    monkeypatch.setattr(runsc_install.time, "sleep", lambda seconds: None)
    with caplog.at_level(logging.INFO, logger="openmicrovm.runtime.runsc_install"):
        status = runsc_install.main()
    assert "not installed: cannot download http://127.0.0.1:9/dists/trixie/InRelease" in caplog.text
    assert status == 0  # install.sh goes on
    if runsc.system_binary() and runsc.probe(runsc.system_binary() or ""):
        assert "falls back to runsc" in caplog.text
    else:
        assert "process driver" in caplog.text
    assert not (tmp_path / "cache" / "runsc").exists() or not any((tmp_path / "cache" / "runsc").iterdir())


def test_a_release_of_another_suite_is_refused(
    mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = mirror.release.replace("Codename: trixie", "Codename: bookworm")
    monkeypatch.setattr(runsc_install, "verified_release", lambda signed: other)
    with pytest.raises(runsc_install.InstallError, match="signed, but for another suite"):
        runsc_install.install(tmp_path / "cache", mirror=mirror.url)


def test_mirrors_are_the_override_or_apts_then_debs_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENMICROVM_DEBIAN_MIRROR", "http://mirror.example/debian/")
    assert runsc_install._mirrors() == ["http://mirror.example/debian"]
    monkeypatch.delenv("OPENMICROVM_DEBIAN_MIRROR")
    mirrors = runsc_install._mirrors()
    assert mirrors[-1] == runsc_install.DEFAULT_MIRROR and len(mirrors) == len(set(mirrors)) <= 2
