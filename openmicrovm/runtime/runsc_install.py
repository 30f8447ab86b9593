"""Installs a newer runsc (gVisor) than Debian 12 ships, from Debian 13's package, into the cache.

    python -m openmicrovm.runtime.runsc_install        (as root; install.sh runs it)

Debian 12's runsc (0.0~20221219) runs only on the slow ptrace platform, and its checkpoint fails
for every asyncio app (an epoll instance watching a listening socket). Debian 13 (trixie) ships
0.0~20240729: two more years of checkpoint/restore fixes, a faster netstack and the systrap
platform. runsc is a
static Go binary, so the one in trixie's .deb runs on Debian 12 as it is. The steps:

  1. fetch dists/<suite>/InRelease and check its signature with gpgv against Debian's archive
     keyring (Debian 12's debian-archive-keyring holds the trixie keys);
  2. fetch main/binary-<arch>/Packages.xz (or .gz) and check its SHA256 against InRelease;
  3. find the `runsc` stanza whose version starts with VERSION_PREFIX (pinned: a later gVisor
     could change checkpoint formats or flags; moving the pin is a deliberate, tested change);
  4. download pool/.../runsc_<version>_<arch>.deb and check its size and SHA256 against Packages;
  5. take usr/bin/runsc out of it (dpkg-deb), check that `runsc --version` runs and says the
     pinned version, and move it into <cache dir>/runsc/<Debian version>/runsc in one rename.

Nothing is written outside the cache dir and no package is installed, so apt's runsc (which the
driver falls back on, and which restores snapshots made before the upgrade) stays as it is.
Running it again is a no-op once the pinned version is in the cache, without network access.
When the download is impossible (no mirror, a bad signature or checksum) it logs why and leaves
the driver on the runsc it finds on PATH. It exits 0 either way, so that install.sh goes on: with
no working runsc at all it says so, and the server's "auto" driver is then the process driver.

Settings: the cache dir is the server's (settings file / $OPENMICROVM_CACHE_DIR); the mirror is
$OPENMICROVM_DEBIAN_MIRROR or the one apt uses; $OPENMICROVM_RUNSC_SUITE and
$OPENMICROVM_RUNSC_VERSION_PREFIX override the suite and the pin.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import lzma
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from . import runsc as runsc_binaries

log = logging.getLogger("openmicrovm.runtime.runsc_install")

SUITE = "trixie"
PACKAGE = "runsc"
VERSION_PREFIX = "0.0~20240729."
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SOURCE_FILE = "source.json"  # beside the binary: where it came from
ATTEMPTS = 3
TIMEOUT = 30.0
_ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}


class InstallError(Exception):
    """Why the pinned runsc cannot be installed; the driver keeps the runsc on PATH."""


@dataclass(frozen=True)
class Package:
    version: str
    filename: str
    size: int
    sha256: str


# ---------------------------------------------------------------------------------- helpers


def _mirrors() -> list[str]:
    """$OPENMICROVM_DEBIAN_MIRROR alone when set; else the mirror apt uses, then deb.debian.org
    (a local mirror may carry bookworm only)."""
    override = os.environ.get("OPENMICROVM_DEBIAN_MIRROR")
    if override:
        return [override.rstrip("/")]
    found: list[str] = []
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    try:
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                uri = line.split(":", 1)[1].strip().split()[0].rstrip("/")
                if not uri.endswith("security") and uri not in found:
                    found.append(uri)
    except OSError:
        pass
    return found[:1] + ([DEFAULT_MIRROR] if DEFAULT_MIRROR not in found[:1] else [])


def _arch() -> str:
    machine = platform.machine()
    if machine not in _ARCHES:
        raise InstallError(f"no Debian runsc for this machine ({machine})")
    return _ARCHES[machine]


def _fetch(url: str, target: Path | None = None) -> bytes:
    """GET url (into target when given, returning b""), trying again on transient errors."""
    last: Exception | None = None
    for attempt in range(ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                if target is None:
                    return bytes(response.read())
                with open(target, "wb") as out:
                    shutil.copyfileobj(response, out, 1 << 20)
                return b""
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise InstallError(f"{url}: not found on the mirror") from None
            last = error
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            last = error
        time.sleep(1.0 * (attempt + 1))
    raise InstallError(f"cannot download {url}: {last}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_release(signed: bytes) -> str:
    """The text of an InRelease file whose signature gpgv accepts, from Debian's keyring."""
    gpgv = shutil.which("gpgv")
    if gpgv is None or not KEYRING.is_file():
        raise InstallError(
            f"cannot check the archive signature: gpgv or {KEYRING} is missing "
            "(apt-get install gpgv debian-archive-keyring)"
        )
    with tempfile.TemporaryDirectory(prefix="omv-runsc-") as temp:
        signed_path, plain_path = Path(temp) / "InRelease", Path(temp) / "Release"
        signed_path.write_bytes(signed)
        result = subprocess.run(
            [gpgv, "--keyring", str(KEYRING), "--output", str(plain_path), str(signed_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0 or not plain_path.exists():
            raise InstallError(f"the archive's InRelease signature does not verify: {result.stderr.strip()}")
        return plain_path.read_text(errors="replace")


def release_field(release: str, name: str) -> str:
    for line in release.splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return ""


def release_sha256(release: str) -> dict[str, tuple[str, int]]:
    """path -> (sha256, size) from the SHA256 section of a Release file."""
    entries: dict[str, tuple[str, int]] = {}
    in_section = False
    for line in release.splitlines():
        if not line.startswith(" "):
            in_section = line.strip() == "SHA256:"
            continue
        if in_section:
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit():
                entries[parts[2]] = (parts[0].lower(), int(parts[1]))
    return entries


def parse_packages(text: str, name: str) -> list[Package]:
    """Every stanza of package `name` in a Packages index."""
    found = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Package") != name:
            continue
        try:
            found.append(
                Package(fields["Version"], fields["Filename"], int(fields["Size"]), fields["SHA256"].lower())
            )
        except (KeyError, ValueError):
            continue
    return found


def _compare_versions(a: str, b: str) -> int:
    if a == b:
        return 0
    newer = subprocess.run(["dpkg", "--compare-versions", a, "gt", b], capture_output=True).returncode == 0
    return 1 if newer else -1


def newest(packages: list[Package], prefix: str) -> Package:
    matching = [p for p in packages if p.version.startswith(prefix)]
    if not matching:
        listed = ", ".join(sorted(p.version for p in packages)) or "none"
        raise InstallError(f"the index has no {PACKAGE} {prefix}* (it has: {listed})")
    return max(matching, key=functools.cmp_to_key(lambda x, y: _compare_versions(x.version, y.version)))


def _packages_index(mirror: str, suite: str, arch: str, files: dict[str, tuple[str, int]]) -> str:
    for suffix, decompress in ((".xz", lzma.decompress), (".gz", lambda d: zlib.decompress(d, 47))):
        path = f"main/binary-{arch}/Packages{suffix}"
        if path not in files:
            continue
        data = _fetch(f"{mirror}/dists/{suite}/{path}")
        sha256, size = files[path]
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise InstallError(f"{path} does not match the checksum in the signed InRelease")
        return decompress(data).decode("utf-8", errors="replace")
    raise InstallError(f"InRelease of {suite} lists no main/binary-{arch}/Packages index")


def _extract_runsc(deb: Path, target: Path) -> None:
    """usr/bin/runsc from the .deb, through dpkg-deb (present on every Debian)."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as tar_stream:
        assert tar_stream.stdout is not None
        with tarfile.open(fileobj=tar_stream.stdout, mode="r|") as archive:
            for member in archive:
                if member.name.lstrip("./") == "usr/bin/runsc" and member.isfile():
                    source = archive.extractfile(member)
                    assert source is not None
                    with open(target, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
                    os.chmod(target, 0o755)
                    break
            else:
                raise InstallError(f"{deb.name} holds no usr/bin/runsc")
        # The tar stream may not have been read to its end: dpkg-deb then dies of SIGPIPE.
        tar_stream.stdout.close()
    if not target.is_file():
        raise InstallError(f"cannot extract runsc from {deb.name}")


# ---------------------------------------------------------------------------------- the steps


def installed_version(cache_dir: Path, prefix: str) -> runsc_binaries.Runsc | None:
    """A working runsc of the pinned version already in the cache."""
    for binary in reversed(runsc_binaries.cached_binaries(cache_dir)):
        if binary.parent.name.startswith(prefix):
            found = runsc_binaries.probe(binary)
            if found is not None:
                return found
    return None


def install(
    cache_dir: Path,
    *,
    mirror: str | None = None,
    suite: str = SUITE,
    prefix: str = VERSION_PREFIX,
) -> runsc_binaries.Runsc:
    """Install the pinned runsc into cache_dir (a no-op when it is there). Raises InstallError."""
    present = installed_version(cache_dir, prefix)
    if present is not None:
        log.info("%s is already installed", present.describe())
        return present
    if os.geteuid() != 0:
        raise InstallError("must run as root (the driver runs runsc as root)")
    problems = []
    for candidate in [mirror.rstrip("/")] if mirror else _mirrors():
        try:
            return _install_from(cache_dir, candidate, suite, prefix)
        except InstallError as error:
            problems.append(str(error))
            log.debug("%s", error)
    raise InstallError("; ".join(problems))


def _install_from(cache_dir: Path, mirror: str, suite: str, prefix: str) -> runsc_binaries.Runsc:
    arch = _arch()
    release = verified_release(_fetch(f"{mirror}/dists/{suite}/InRelease"))
    if suite not in (release_field(release, "Codename"), release_field(release, "Suite")):
        raise InstallError(f"{mirror}/dists/{suite}/InRelease is signed, but for another suite")
    package = newest(
        parse_packages(_packages_index(mirror, suite, arch, release_sha256(release)), PACKAGE), prefix
    )
    root = cache_dir / runsc_binaries.CACHE_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / package.version
    with tempfile.TemporaryDirectory(prefix=".install-", dir=root) as temp:
        work = Path(temp)
        deb = work / Path(package.filename).name
        url = f"{mirror}/{package.filename}"
        log.info("downloading %s (%d bytes)", url, package.size)
        _fetch(url, deb)
        if deb.stat().st_size != package.size or _sha256_file(deb) != package.sha256:
            raise InstallError(f"{deb.name} does not match the SHA256 in the signed package index")
        staged = work / "dir"
        staged.mkdir()
        _extract_runsc(deb, staged / "runsc")
        found = runsc_binaries.probe(staged / "runsc")
        upstream = package.version.split("-")[0]
        if found is None or found.version != upstream:
            raise InstallError(
                f"the extracted runsc does not run here or is not {upstream} "
                f"(says {found.version if found else 'nothing'})"
            )
        (staged / SOURCE_FILE).write_text(
            json.dumps(
                {
                    "package": PACKAGE,
                    "version": package.version,
                    "suite": suite,
                    "url": url,
                    "sha256": package.sha256,
                    "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=1,
            )
            + "\n"
        )
        os.chmod(staged, 0o755)
        if final.exists() and runsc_binaries.probe(final / "runsc") is None:
            shutil.rmtree(final)  # a broken earlier install
        try:
            os.rename(staged, final)
        except OSError:
            if runsc_binaries.probe(final / "runsc") is None:
                raise
            log.info("another install put %s in place first", final)
    installed = runsc_binaries.probe(final / "runsc")
    if installed is None:
        raise InstallError(f"{final / 'runsc'} does not run after installing it")
    log.info("installed %s from %s", installed.describe(), url)
    return installed


def _cache_dir() -> Path:
    try:
        from openmicrovm.config import load_settings

        return load_settings().cache_dir
    except Exception as error:  # a broken settings file must not stop the install
        log.warning("cannot read the settings (%s); using the default cache dir", error)
        return runsc_binaries.default_cache_dirs()[0]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="runsc_install: %(message)s")
    cache_dir = _cache_dir()
    try:
        result = install(
            cache_dir,
            suite=os.environ.get("OPENMICROVM_RUNSC_SUITE") or SUITE,
            prefix=os.environ.get("OPENMICROVM_RUNSC_VERSION_PREFIX") or VERSION_PREFIX,
        )
        log.info("the gvisor driver will use %s", result.describe())
        return 0
    except Exception as error:  # whatever went wrong, install.sh must go on with apt's runsc
        reason = str(error) if isinstance(error, InstallError) else f"{type(error).__name__}: {error}"
        log.warning("runsc %s* not installed: %s", VERSION_PREFIX, reason)
    try:
        fallback = runsc_binaries.choose(cache_dirs=[cache_dir])
    except runsc_binaries.RunscError as error:
        log.error("no usable runsc either (%s); the server will use the process driver", error)
        return 0
    log.warning(
        "the gvisor driver falls back to %s (%s platform)", fallback.describe(), fallback.default_platform
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
