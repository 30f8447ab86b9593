"""Puts the console's pinned browser assets (vendor.py) into the server's cache dir.

    python -m openmicrovm.console.vendor_install [--cache-dir DIR] [--registry URL]
                                                                      (install.sh runs it)

For each pinned package that is not in the cache at its pinned version, it downloads the tarball
from the npm registry, checks it against the pinned sha512 integrity before opening it, takes out
the listed files only, and renames a complete directory into place (vendor.py describes the
layout). A package already there is left alone, without network access; a changed pin fetches
again and removes the previous version's directory.

It refuses a tarball that does not match its pin or that holds a link, an absolute name or a `..`
name, and then leaves nothing behind. Without the assets the console still runs, but its terminal
cannot: the command exits non-zero and says how to fetch them later.

Settings: the cache dir is the server's (settings file / $OPENMICROVM_CACHE_DIR) unless --cache-dir
names one. --registry fetches the same pinned tarballs from an npm mirror; the integrity pins still
decide what is accepted.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from openmicrovm.config import configured_cache_dir
from openmicrovm.console import vendor
from openmicrovm.console.vendor import VendorPackage

log = logging.getLogger("openmicrovm.console.vendor_install")

DOWNLOAD_TIMEOUT = 60.0
# Far above the pinned tarballs (xterm's is 1.4 MB): a cap on what a wrong URL can make us buffer.
MAX_TARBALL_BYTES = 64 << 20
RETRY_HINT = (
    "run `python -m openmicrovm.console.vendor_install` (or ./install.sh) again once this host "
    "reaches the npm registry (a proxy goes in $https_proxy), or name a reachable npm mirror with "
    "--registry URL; until then the console works without its terminal"
)


class VendorError(Exception):
    """Why a pinned package cannot be installed; the message says what to do."""


def tarball_url(package: VendorPackage, registry: str | None = None) -> str:
    """The pinned tarball URL, or the same path on another registry (npm mirrors keep the layout)."""
    if registry is None:
        return package.tarball
    return registry.rstrip("/") + urlsplit(package.tarball).path


def download(url: str, timeout: float = DOWNLOAD_TIMEOUT) -> bytes:
    if urlsplit(url).scheme not in ("https", "http"):
        raise VendorError(f"{url}: only http and https registries are supported")
    request = urllib.request.Request(url, headers={"User-Agent": "openmicrovm-vendor-install"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_TARBALL_BYTES + 1)
    except urllib.error.HTTPError as error:
        raise VendorError(
            f"cannot download {url}: the registry answered {error.code} {error.reason}; {RETRY_HINT}"
        ) from None
    except urllib.error.URLError as error:
        raise VendorError(f"cannot download {url}: {error.reason}; {RETRY_HINT}") from None
    except (TimeoutError, OSError) as error:
        raise VendorError(f"cannot download {url}: {error or 'timed out'}; {RETRY_HINT}") from None
    if len(data) > MAX_TARBALL_BYTES:
        raise VendorError(f"{url} is larger than {MAX_TARBALL_BYTES} bytes: not the pinned tarball")
    return data


def check_integrity(data: bytes, package: VendorPackage, url: str) -> None:
    algorithm, _, expected = package.integrity.partition("-")
    if algorithm != "sha512" or not expected:
        raise VendorError(f"{package.spec}: the pinned integrity must be sha512-<base64>")
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if not hmac.compare_digest(actual, expected):
        raise VendorError(
            f"{url} is not the pinned {package.spec}: its sha512 is {actual}, the pin says {expected}. "
            "Nothing was installed. A mirror or proxy may have altered it; if the registry really "
            "republished it, a new pin in openmicrovm/console/vendor.py is a deliberate change"
        )


def _safe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def unpack(data: bytes, package: VendorPackage, url: str) -> dict[str, bytes]:
    """The kept files' contents by served name, read in memory: nothing touches the disk until the
    whole archive has been judged."""
    wanted = dict(package.files)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            for member in archive:
                # Any such member means the archive is not a plain npm package: refuse all of it.
                if member.issym() or member.islnk():
                    raise VendorError(f"{url}: refusing a tarball with a link ({member.name})")
                if not _safe_name(member.name):
                    raise VendorError(f"{url}: refusing a tarball with an unsafe name ({member.name!r})")
                served = wanted.get(member.name)
                if served is None:
                    continue
                if not member.isfile():
                    raise VendorError(f"{url}: {member.name} is not a regular file")
                if served in found:
                    raise VendorError(f"{url}: {member.name} appears twice")
                source = archive.extractfile(member)
                assert source is not None  # a regular file always has contents
                found[served] = source.read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise VendorError(f"{url} is not a readable .tgz: {error}") from None
    absent = [member for member, served in package.files if served not in found]
    if absent:
        raise VendorError(f"{url} lacks {', '.join(absent)}: is {package.spec} the right pin?")
    return found


def _write(directory: Path, files: dict[str, bytes], package: VendorPackage, url: str) -> None:
    for served, content in files.items():
        target = directory / served
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(0o644)
    marker = {**package.pin(), "tarball": url, "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # Last: a directory with a marker is complete.
    (directory / vendor.PIN_FILE).write_text(json.dumps(marker, indent=1) + "\n")
    for path in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        path.chmod(0o755)  # readable by a server running as another user than the installer


def _remove_other_versions(cache_dir: Path, package: VendorPackage) -> None:
    keep = package.directory
    prefix = keep.rsplit("@", 1)[0] + "@"
    for entry in vendor.vendor_dir(cache_dir).iterdir():
        if entry.name.startswith(prefix) and entry.name != keep and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _put_in_place(cache_dir: Path, package: VendorPackage, files: dict[str, bytes], url: str) -> None:
    root = vendor.vendor_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = vendor.package_dir(cache_dir, package)
    with tempfile.TemporaryDirectory(prefix=".install-", dir=root) as temp:
        staged = Path(temp) / "package"
        staged.mkdir()
        _write(staged, files, package, url)
        if final.exists():
            # An incomplete or tampered earlier install (else installed() would have kept it):
            # moved aside first, as a rename cannot replace a non-empty directory.
            os.rename(final, Path(temp) / "previous")
        try:
            os.rename(staged, final)
        except OSError:
            if not vendor.installed(cache_dir, package):
                raise
            log.info("another install put %s in place first", final)
    _remove_other_versions(cache_dir, package)


def install(
    cache_dir: Path,
    *,
    packages: Sequence[VendorPackage] = vendor.PACKAGES,
    registry: str | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> list[str]:
    """Fetch every pinned package not yet in the cache; returns the specs it fetched ([] when all
    were there). Raises VendorError at the first package it cannot install."""
    fetched = []
    for package in packages:
        where = vendor.package_dir(cache_dir, package)
        if vendor.installed(cache_dir, package):
            log.info("%s is already there (%s)", package.spec, where)
            continue
        url = tarball_url(package, registry)
        data = download(url, timeout)
        check_integrity(data, package, url)
        files = unpack(data, package, url)
        _put_in_place(cache_dir, package, files, url)
        log.info("%s fetched from %s into %s", package.spec, url, where)
        fetched.append(package.spec)
    return fetched


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openmicrovm.console.vendor_install")
    parser.add_argument("--cache-dir", type=Path, help="the server's cache dir (default: from its settings)")
    parser.add_argument(
        "--registry",
        help=f"an npm registry or mirror to fetch the pinned tarballs from (default {vendor.REGISTRY})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="vendor_install: %(message)s", stream=sys.stdout)
    cache_dir = args.cache_dir or configured_cache_dir(log)
    try:
        install(cache_dir, registry=args.registry)
    except (VendorError, OSError) as error:
        reason = str(error) if isinstance(error, VendorError) else f"cannot write {cache_dir}: {error}"
        print(f"vendor_install: the console's terminal assets are not installed: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
