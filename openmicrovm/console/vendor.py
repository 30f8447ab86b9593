"""The console's third-party browser assets: xterm.js and its fit addon, pinned.

They come from the npm registry when the server is installed (vendor_install.py puts them in the
cache dir), never from a CDN when a page loads: the console works offline and loads no code that
the host did not check. Each package is pinned to one version and to the registry's `dist.integrity`
of its tarball, so a moved tag or a tampered mirror cannot change what is served. Moving a pin is a
deliberate change: new version, tarball and integrity together, from the registry's metadata
(https://registry.npmjs.org/@xterm%2fxterm).

On disk, each package has a directory of its own named after its pinned version,
<cache dir>/console/vendor/<package>@<version>/, holding the kept files under their served names
and a marker (PIN_FILE) written last. vendor_install renames that directory into place in one step,
so a package is either wholly there at its pinned version or absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"
PIN_FILE = "pin.json"


@dataclass(frozen=True)
class VendorPackage:
    """One pinned npm package and the files the console serves from it."""

    name: str  # the npm name, e.g. "@xterm/xterm"
    version: str
    tarball: str  # the registry's dist.tarball
    integrity: str  # the registry's dist.integrity: "sha512-" + base64 digest of the tarball
    # (member of the tarball, name served below /console/vendor/)
    files: tuple[tuple[str, str], ...]

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def directory(self) -> str:
        """Its directory in the vendor dir: one per pinned version, so a new pin is a new name."""
        return f"{self.name.lstrip('@').replace('/', '+')}@{self.version}"

    def pin(self) -> dict[str, str]:
        """What the marker says; a marker that differs (another pin) means: fetch again."""
        return {"package": self.name, "version": self.version, "integrity": self.integrity}


XTERM = VendorPackage(
    name="@xterm/xterm",
    version="6.0.0",
    tarball="https://registry.npmjs.org/@xterm/xterm/-/xterm-6.0.0.tgz",
    integrity="sha512-TQwDdQGtwwDt+2cgKDLn0IRaSxYu1tSUjgKarSDkUM0ZNiSRXFpjxEsvc/Zgc5kq5omJ+V0a8/kIM2WD3sMOYg==",
    files=(
        ("package/lib/xterm.js", "xterm/xterm.js"),
        ("package/css/xterm.css", "xterm/xterm.css"),
        ("package/LICENSE", "xterm/LICENSE"),
    ),
)
XTERM_ADDON_FIT = VendorPackage(
    name="@xterm/addon-fit",
    version="0.11.0",
    tarball="https://registry.npmjs.org/@xterm/addon-fit/-/addon-fit-0.11.0.tgz",
    integrity="sha512-jYcgT6xtVYhnhgxh3QgYDnnNMYTcf8ElbxxFzX0IZo+vabQqSPAjC3c1wJrKB5E19VwQei89QCiZZP86DCPF7g==",
    files=(
        ("package/lib/addon-fit.js", "xterm/addon-fit.js"),
        ("package/LICENSE", "xterm/addon-fit.LICENSE"),
    ),
)
PACKAGES: tuple[VendorPackage, ...] = (XTERM, XTERM_ADDON_FIT)


def _by_served_name(packages: tuple[VendorPackage, ...]) -> dict[str, VendorPackage]:
    owners: dict[str, VendorPackage] = {}
    for package in packages:
        for _, served in package.files:
            if served in owners:
                raise ValueError(f"{served} is served from both {owners[served].spec} and {package.spec}")
            owners[served] = package
    return owners


# Built once: the only names a request can ever be answered with.
_SERVED = _by_served_name(PACKAGES)


def vendor_dir(cache_dir: Path) -> Path:
    return cache_dir / "console" / "vendor"


def package_dir(cache_dir: Path, package: VendorPackage) -> Path:
    return vendor_dir(cache_dir) / package.directory


def installed(cache_dir: Path, package: VendorPackage) -> bool:
    """The package is in the cache at its pinned version and integrity, with every kept file."""
    directory = package_dir(cache_dir, package)
    try:
        marker = json.loads((directory / PIN_FILE).read_text())
    except (OSError, ValueError):
        return False
    # The marker also says where and when it was fetched; only the pin decides.
    pinned = package.pin()
    if not isinstance(marker, dict) or {key: marker.get(key) for key in pinned} != pinned:
        return False
    return all((directory / served).is_file() for _, served in package.files)


def served_file(cache_dir: Path, name: str) -> Path | None:
    """The file to answer /console/vendor/<name> with, or None (not a pinned name, or not
    installed). `name` only selects an entry of the pinned list: it is never joined onto a dir."""
    package = _SERVED.get(name)
    if package is None:
        return None
    # The path is built from the pinned entry, not from the request's spelling of it.
    served = next(served for _, served in package.files if served == name)
    path = package_dir(cache_dir, package) / served
    return path if path.is_file() else None


def missing(cache_dir: Path, packages: tuple[VendorPackage, ...] = PACKAGES) -> list[str]:
    """The served names that are not installed at their pinned version ([] when all are)."""
    return [
        served for package in packages if not installed(cache_dir, package) for _, served in package.files
    ]
