"""Puts the pinned runsc (gVisor) into the server's cache dir, fetched through apt.

    python -m openmicrovm.runtime.runsc_install [--record FILE] [--apt-source FILE]
                                                           (as root; install.sh runs it)

Debian 12's runsc (0.0~20221219) runs only on the slow ptrace platform, and its checkpoint fails
for every asyncio app (an epoll instance watching a listening socket). Debian 13 (trixie) ships
0.0~20240729: two more years of checkpoint/restore fixes, a faster netstack and the systrap
platform. runsc is a static Go binary with no dependencies, so trixie's build runs on Debian 12 as
it is.

Where it comes from is apt's business, so that the host's mirrors, proxies and keyrings apply:
  - on Debian 12, install.sh adds a trixie source (APT_SOURCE) pinned at -1, so that apt knows
    trixie's runsc but never installs or upgrades anything from trixie by itself. This module
    refreshes apt's index of that one source (the host's other sources are left alone) and
    `apt-get download`s the pinned version, which apt checks against the signed index;
  - on Debian 13, apt's own runsc (/usr/bin/runsc, which install.sh installs) is the pinned
    version: nothing is fetched.

The .deb is downloaded, not installed: installing it would replace /usr/bin/runsc, and a snapshot
restores only with the runsc that made it, so snapshots made by the host's runsc would no longer
restore (see runsc.py). Instead usr/bin/runsc is taken out of the .deb (dpkg-deb), checked to run
and to say the pinned version, and moved into <cache dir>/runsc/<Debian version>/runsc in one
rename, beside a source.json saying where it came from. Pinned rather than "trixie's newest": a
later gVisor could change checkpoint formats or flags; moving the pin is a deliberate, tested
change (install.sh names the same pin in its plan).

Running it again is a no-op once the pinned version is in the cache, without network access. When
it cannot fetch (no network, no trixie source, apt refuses a signature or checksum) it says why
and leaves the driver on the runsc it finds on PATH. It exits 0 either way, so that install.sh
goes on: with no working runsc at all it says so, and the server's "auto" driver is then the
process driver.

Settings: the cache dir is the server's (settings file / $OPENMICROVM_CACHE_DIR);
$OPENMICROVM_RUNSC_VERSION_PREFIX overrides the pin.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import configured_cache_dir
from . import runsc as runsc_binaries

log = logging.getLogger("openmicrovm.runtime.runsc_install")

PACKAGE = "runsc"
VERSION_PREFIX = "0.0~20240729."
# The trixie source install.sh writes on Debian 12 (its pin sits in /etc/apt/preferences.d/).
APT_SOURCE = Path("/etc/apt/sources.list.d/openmicrovm-trixie.sources")
SOURCE_FILE = "source.json"  # beside the binary: where it came from
APT_TIMEOUT = 600.0


class InstallError(Exception):
    """Why the pinned runsc cannot be installed; the driver keeps the runsc on PATH."""


@dataclass(frozen=True)
class Package:
    version: str
    filename: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Apt:
    """How apt is called: the host's configuration plus `options` (`-o Name=value` pairs), which
    the tests use to point apt at a repository and a state of their own."""

    options: tuple[str, ...] = ()

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        argv = [tool, *(f"-o{option}" for option in self.options), *args]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=APT_TIMEOUT)
        except FileNotFoundError:
            raise InstallError(f"{tool} is missing: this needs a Debian system with apt") from None
        except subprocess.TimeoutExpired:
            raise InstallError(f"`{' '.join(argv)}` did not finish in {APT_TIMEOUT:.0f} s") from None


# The host's apt as configured; tests put an Apt of their own here.
HOST_APT = Apt()


def _apt_errors(result: subprocess.CompletedProcess[str]) -> str:
    """apt's own error and warning lines, which say what went wrong better than we could."""
    lines = [line for line in result.stderr.splitlines() if line[:2] in ("E:", "W:")]
    return " ".join(lines or result.stderr.strip().splitlines()[-3:]) or f"exit status {result.returncode}"


# ---------------------------------------------------------------------------------- helpers


def parse_packages(text: str, name: str) -> list[Package]:
    """Every stanza of package `name` in a Packages index (or `apt-cache show` output) that says
    where its .deb is; dpkg's status entry of an installed version does not, and is skipped."""
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
        listed = ", ".join(sorted({p.version for p in packages})) or "none"
        raise InstallError(f"apt knows no {PACKAGE} {prefix}* (it has: {listed})")
    return max(matching, key=functools.cmp_to_key(lambda x, y: _compare_versions(x.version, y.version)))


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


def _let_apt_write(directory: Path) -> None:
    """apt downloads as its unprivileged _apt user: give it the download dir, else apt falls
    back to downloading as root and warns about it."""
    try:
        user = pwd.getpwnam("_apt")
    except KeyError:
        return
    os.chown(directory, user.pw_uid, -1)


# ---------------------------------------------------------------------------------- the steps


def installed_version(cache_dir: Path, prefix: str) -> runsc_binaries.Runsc | None:
    """A working runsc of the pinned version already in the cache."""
    for binary in reversed(runsc_binaries.cached_binaries(cache_dir)):
        if binary.parent.name.startswith(prefix):
            found = runsc_binaries.probe(binary)
            if found is not None:
                return found
    return None


def system_is_pinned(prefix: str) -> runsc_binaries.Runsc | None:
    """apt's installed runsc when it is the pinned version (Debian 13): nothing to fetch then."""
    system = runsc_binaries.system_binary()
    found = runsc_binaries.probe(system) if system else None
    return found if found is not None and found.version.startswith(prefix) else None


def refresh_source(apt: Apt, source: Path) -> None:
    """`apt-get update` of this one source: quick, and it leaves the indexes of the host's other
    sources as they are (List-Cleanup=0 keeps apt from deleting them as unknown)."""
    result = apt.run(
        "apt-get",
        f"-oDir::Etc::sourcelist={source}",
        "-oDir::Etc::sourceparts=-",
        "-oAPT::Get::List-Cleanup=0",
        "--error-on=any",
        "update",
    )
    if result.returncode != 0:
        # An index from an earlier update may still name the pinned version: go on with it.
        log.warning(
            "apt-get update of %s failed (%s); trying apt's existing index", source, _apt_errors(result)
        )


def candidates(apt: Apt) -> list[Package]:
    result = apt.run("apt-cache", "show", PACKAGE)
    if result.returncode != 0:
        return []  # "No packages found": newest() then says what is missing
    return parse_packages(result.stdout, PACKAGE)


def install(
    cache_dir: Path,
    *,
    apt: Apt | None = None,
    source: Path | None = APT_SOURCE,
    prefix: str = VERSION_PREFIX,
) -> runsc_binaries.Runsc:
    """Make the pinned runsc available (a no-op when it is cached or is apt's own). Raises
    InstallError. `source`: the trixie source to refresh first, when that file exists."""
    present = installed_version(cache_dir, prefix) or system_is_pinned(prefix)
    if present is not None:
        log.info("%s is already here", present.describe())
        return present
    if os.geteuid() != 0:
        raise InstallError("must run as root (apt-get download and the driver's runsc need it)")
    apt = apt or HOST_APT
    if source is not None and source.is_file():
        refresh_source(apt, source)
    try:
        package = newest(candidates(apt), prefix)
    except InstallError as error:
        raise InstallError(
            f"{error}; on Debian 12 it comes from the trixie source that ./install.sh adds "
            f"({APT_SOURCE}), on Debian 13 from the host's own sources"
        ) from None
    root = cache_dir / runsc_binaries.CACHE_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / package.version
    # The .deb goes to a fresh dir under /tmp, which apt's _apt user can reach (the cache dir is
    # often under /root); the binary is staged in the cache root, to be renamed into place.
    with (
        tempfile.TemporaryDirectory(prefix="omv-runsc-") as download,
        tempfile.TemporaryDirectory(prefix=".install-", dir=root) as temp,
    ):
        _let_apt_write(Path(download))
        wanted = f"{PACKAGE}={package.version}"
        listed = apt.run("apt-get", "download", "--print-uris", wanted)
        uri = listed.stdout.split()[0].strip("'") if listed.returncode == 0 and listed.stdout.strip() else ""
        log.info("apt-get download %s (%d bytes)", wanted, package.size)
        fetched = apt.run("apt-get", "download", wanted, cwd=Path(download))
        debs = sorted(Path(download).glob(f"{PACKAGE}_*.deb"))
        if fetched.returncode != 0 or not debs:
            raise InstallError(f"apt-get download {wanted} failed: {_apt_errors(fetched)}")
        staged = Path(temp) / "dir"
        staged.mkdir()
        _extract_runsc(debs[0], staged / "runsc")
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
                    "fetched_with": "apt-get download",
                    "url": uri,
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
    log.info("installed %s from %s", installed.describe(), uri or "apt")
    return installed


def record(path: Path, installed: runsc_binaries.Runsc, cache_dir: Path) -> None:
    """Note the cache entry in install.sh's record, so that `install.sh --uninstall` removes it
    (apt's /usr/bin/runsc is not noted: it is a package, recorded as one when install.sh adds it)."""
    entry = Path(installed.path).parent
    if entry.parent != cache_dir / runsc_binaries.CACHE_SUBDIR:
        return
    lines = path.read_text().splitlines() if path.exists() else []
    if str(entry) not in lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as out:
            out.write(f"{entry}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openmicrovm.runtime.runsc_install")
    parser.add_argument("--record", type=Path, help="append the cache entry it uses to this file")
    parser.add_argument(
        "--apt-source",
        type=Path,
        default=APT_SOURCE,
        help=f"the trixie source to refresh (default {APT_SOURCE})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="runsc_install: %(message)s")
    cache_dir = configured_cache_dir(log)
    prefix = os.environ.get("OPENMICROVM_RUNSC_VERSION_PREFIX") or VERSION_PREFIX
    try:
        result = install(cache_dir, source=args.apt_source, prefix=prefix)
        if args.record is not None:
            record(args.record, result, cache_dir)
        log.info("the gvisor driver will use %s", result.describe())
        return 0
    except Exception as error:  # whatever went wrong, install.sh must go on with apt's runsc
        reason = str(error) if isinstance(error, InstallError) else f"{type(error).__name__}: {error}"
        log.warning("runsc %s* not installed: %s", prefix, reason)
    try:
        fallback = runsc_binaries.choose(cache_dirs=[cache_dir])
    except runsc_binaries.RunscError as error:
        log.error("no usable runsc either (%s); the server will use the process driver", error)
        return 0
    log.warning(
        "the gvisor driver falls back to %s (%s platform); run ./install.sh again once apt can reach "
        "its mirror to get the pinned one",
        fallback.describe(),
        fallback.default_platform,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
