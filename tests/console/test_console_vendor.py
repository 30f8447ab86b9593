"""vendor_install against a fake npm registry on 127.0.0.1 (never the real one): what it keeps,
what it refuses, and that it refuses before writing anything; and vendor.served_file's allow-list.
One test checks the real installed assets, when a real install has put them in place."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import re
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from openmicrovm.config import load_settings
from openmicrovm.console import vendor, vendor_install
from openmicrovm.console.vendor import VendorPackage


class FakeRegistry:
    """Serves tarballs by URL path and counts the requests it answers."""

    def __init__(self) -> None:
        self.tarballs: dict[str, bytes] = {}
        self.requests: list[str] = []
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                registry.requests.append(self.path)
                body = registry.tarballs.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    fake = FakeRegistry()
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def tarball(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return out.getvalue()


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def contents(package: VendorPackage) -> dict[str, bytes]:
    """A plausible tarball for `package`: its listed members plus files that must not be kept."""
    files = {member: f"{package.spec} {member}\n".encode() for member, _ in package.files}
    files["package/package.json"] = b"{}"
    files["package/lib/extra.js.map"] = b"not kept"
    return files


def publish(
    registry: FakeRegistry, package: VendorPackage, data: bytes, version: str = "9.9.9"
) -> VendorPackage:
    """`package` pinned to `data` as the fake registry serves it."""
    pinned = dataclasses.replace(
        package,
        version=version,
        tarball=f"https://registry.npmjs.org/{package.name}/-/fake-{version}.tgz",
        integrity=integrity(data),
    )
    registry.tarballs[f"/{package.name}/-/fake-{version}.tgz"] = data
    return pinned


def urlpath(package: VendorPackage) -> str:
    return vendor_install.tarball_url(package, "")


def files_under(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def test_a_good_tarball_installs_the_listed_files_only(registry: FakeRegistry, tmp_path: Path) -> None:
    packages = tuple(publish(registry, p, tarball(contents(p))) for p in vendor.PACKAGES)

    fetched = vendor_install.install(tmp_path, packages=packages, registry=registry.url)

    assert fetched == [p.spec for p in packages]
    expected = sorted(
        [f"{p.directory}/{served}" for p in packages for _, served in p.files]
        + [f"{p.directory}/{vendor.PIN_FILE}" for p in packages]
    )
    assert files_under(vendor.vendor_dir(tmp_path)) == expected
    for original, package in zip(vendor.PACKAGES, packages, strict=True):
        for member, served in package.files:
            kept = vendor.package_dir(tmp_path, package) / served
            assert kept.read_bytes() == contents(original)[member]
    assert vendor.missing(tmp_path, packages) == []


def test_a_second_run_fetches_nothing(registry: FakeRegistry, tmp_path: Path) -> None:
    packages = tuple(publish(registry, p, tarball(contents(p))) for p in vendor.PACKAGES)
    vendor_install.install(tmp_path, packages=packages, registry=registry.url)
    asked = len(registry.requests)
    assert asked == len(packages)

    assert vendor_install.install(tmp_path, packages=packages, registry=registry.url) == []
    assert len(registry.requests) == asked


def test_a_new_pin_fetches_again_and_drops_the_old_version(registry: FakeRegistry, tmp_path: Path) -> None:
    old = publish(registry, vendor.XTERM, tarball(contents(vendor.XTERM)), version="1.0.0")
    vendor_install.install(tmp_path, packages=(old,), registry=registry.url)
    new = publish(registry, vendor.XTERM, tarball(contents(vendor.XTERM)), version="2.0.0")

    assert vendor_install.install(tmp_path, packages=(new,), registry=registry.url) == [new.spec]
    assert sorted(p.name for p in vendor.vendor_dir(tmp_path).iterdir()) == [new.directory]


def test_a_damaged_install_is_replaced(registry: FakeRegistry, tmp_path: Path) -> None:
    package = publish(registry, vendor.XTERM, tarball(contents(vendor.XTERM)))
    vendor_install.install(tmp_path, packages=(package,), registry=registry.url)
    served = package.files[0][1]
    (vendor.package_dir(tmp_path, package) / served).unlink()
    assert vendor.missing(tmp_path, (package,)) != []

    assert vendor_install.install(tmp_path, packages=(package,), registry=registry.url) == [package.spec]
    assert vendor.missing(tmp_path, (package,)) == []


def test_bytes_that_do_not_match_the_pin_are_refused(registry: FakeRegistry, tmp_path: Path) -> None:
    package = publish(registry, vendor.XTERM, tarball(contents(vendor.XTERM)))
    # The registry now serves other bytes than those the pin was made from.
    registry.tarballs[urlpath(package)] = tarball({**contents(vendor.XTERM), "package/lib/xterm.js": b"evil"})

    with pytest.raises(vendor_install.VendorError, match="not the pinned"):
        vendor_install.install(tmp_path, packages=(package,), registry=registry.url)
    assert files_under(tmp_path) == []
    assert not vendor.installed(tmp_path, package)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(tarball({**contents(vendor.XTERM), "package/../../escape.js": b"x"}), id="dotdot"),
        pytest.param(tarball({**contents(vendor.XTERM), "/etc/cron.d/x": b"x"}), id="absolute"),
        pytest.param(
            tarball(contents(vendor.XTERM), links={"package/lib/link.js": "/etc/passwd"}), id="symlink"
        ),
        pytest.param(
            tarball(
                {k: v for k, v in contents(vendor.XTERM).items() if k != "package/LICENSE"},
                links={"package/LICENSE": "/etc/passwd"},
            ),
            id="listed-member-is-a-symlink",
        ),
    ],
)
def test_unsafe_members_are_refused(registry: FakeRegistry, tmp_path: Path, data: bytes) -> None:
    # Pinned to these very bytes: the integrity check passes, the member check must refuse.
    package = publish(registry, vendor.XTERM, data)

    with pytest.raises(vendor_install.VendorError, match="refusing"):
        vendor_install.install(tmp_path, packages=(package,), registry=registry.url)
    assert files_under(tmp_path) == []
    assert not (tmp_path.parent / "escape.js").exists()


def test_a_tarball_without_a_listed_file_is_refused(registry: FakeRegistry, tmp_path: Path) -> None:
    files = {k: v for k, v in contents(vendor.XTERM).items() if k != "package/css/xterm.css"}
    package = publish(registry, vendor.XTERM, tarball(files))

    with pytest.raises(vendor_install.VendorError, match=re.escape("package/css/xterm.css")):
        vendor_install.install(tmp_path, packages=(package,), registry=registry.url)
    assert files_under(tmp_path) == []


def test_an_unreachable_registry_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A port nothing listens on: the connection is refused at once.
    with socket_nobody_listens_on() as url:
        status = vendor_install.main(["--cache-dir", str(tmp_path), "--registry", url])
    assert status != 0
    error = capsys.readouterr().err
    assert url in error and "--registry" in error and "vendor_install" in error
    assert files_under(tmp_path) == []


class socket_nobody_listens_on:
    def __enter__(self) -> str:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def __exit__(self, *args: object) -> None:
        self.socket.close()


def test_served_file_answers_only_pinned_names(tmp_path: Path) -> None:
    # The pinned packages' files, laid out by hand, and decoys a joined path would reach.
    for package in vendor.PACKAGES:
        directory = vendor.package_dir(tmp_path, package)
        for _, served in package.files:
            (directory / served).parent.mkdir(parents=True, exist_ok=True)
            (directory / served).write_text(served)
    (vendor.vendor_dir(tmp_path) / "x").write_text("not served")
    (vendor.vendor_dir(tmp_path) / "xterm").mkdir()
    (vendor.vendor_dir(tmp_path) / "xterm" / "x").write_text("not served")

    served = vendor.served_file(tmp_path, "xterm/xterm.js")
    assert served is not None and served.read_text() == "xterm/xterm.js"
    assert vendor.served_file(tmp_path, "xterm/addon-fit.js") is not None
    for name in [
        "../../etc/passwd",
        "xterm/../x",
        "x",
        "xterm/x",
        "/etc/passwd",
        "xterm//xterm.js",
        "./xterm/xterm.js",
        "xterm/xterm.js/",
        "XTERM/xterm.js",
        vendor.PIN_FILE,
        f"{vendor.XTERM.directory}/{vendor.PIN_FILE}",
        "",
    ]:
        assert vendor.served_file(tmp_path, name) is None, name


def test_served_file_is_none_before_the_install(tmp_path: Path) -> None:
    assert vendor.served_file(tmp_path, "xterm/xterm.js") is None
    assert vendor.missing(tmp_path) == [served for p in vendor.PACKAGES for _, served in p.files]


def _real_cache_dir() -> Path:
    try:
        return load_settings().cache_dir
    except ValueError:
        return Path("/nonexistent")


@pytest.mark.skipif(
    bool(vendor.missing(_real_cache_dir())),
    reason="the console's assets are not installed (python -m openmicrovm.console.vendor_install)",
)
def test_the_real_assets_are_installed() -> None:
    cache_dir = _real_cache_dir()
    for package in vendor.PACKAGES:
        for _, served in package.files:
            path = vendor.served_file(cache_dir, served)
            assert path is not None and path.stat().st_size > 0, served
    script = vendor.served_file(cache_dir, "xterm/xterm.js")
    assert script is not None and b"Terminal" in script.read_bytes()
