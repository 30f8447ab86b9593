"""The guest image: a Debian 12 kernel, a busybox initramfs and a debootstrapped root filesystem,
built once per recipe and cached outside the checkout.

The cache key hashes everything that shapes the image (this file, the files baked in, the host's
apt sources), so changing any of them builds a new image instead of booting a stale one. A build
happens in a temporary directory renamed into place at the end: an interrupted build leaves no
half image that a later run could mistake for a finished one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cleanup import kill_group, remove_tree

CACHE_ROOT = Path("/var/cache/openmicrovm-tests/vm")
HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
BASE_ROOTFS_RECIPE = CHECKOUT / "openmicrovm" / "builder" / "base_rootfs.py"
# The cache dir of deploy/openmicrovm.service, inside the guest.
GUEST_PRODUCT_CACHE = Path("var/cache/openmicrovm")
GUEST_FILES = HERE / "guest_files"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
IMAGE_SIZE = "12G"
HOST_PACKAGES = {
    # command that must exist -> the Debian package providing it
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "cpio": "cpio",
    "depmod": "kmod",
    "xz": "xz-utils",
}
BUSYBOX = Path("/bin/busybox")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# What a plain Debian server has, and nothing of openmicrovm's own: install.sh must bring runsc,
# buildah, bubblewrap and the Python packages itself, as it would for a user.
GUEST_PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "netbase",
    "iproute2",
    "nftables",
    "iptables",
    "ca-certificates",
    "python3",
    "python3-venv",
    "kmod",
    "procps",
    "curl",
    "sudo",
    "less",
)
# Loaded by the initramfs in this order (each needs the ones before it).
INITRAMFS_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "libcrc32c",
    "ext4",
)


@dataclass(frozen=True)
class Image:
    directory: Path
    kernel: Path
    initrd: Path
    root: Path
    kernel_version: str


def _run(
    argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # A session of its own, ended with everything in it when we are interrupted: a debootstrap
    # left running would go on writing into the build directory while it is being removed.
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        kill_group(process)
        raise
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {process.returncode}:\n{stdout[-3000:]}{stderr[-3000:]}")
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def ensure_host_packages(say: Callable[[str], None]) -> None:
    missing = sorted({package for command, package in HOST_PACKAGES.items() if not shutil.which(command)})
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", "busybox-static"], capture_output=True, text=True
    ).stdout
    if "ok installed" not in status:  # the initramfs has no libc: only the static busybox runs there
        missing.append("busybox-static")
    if not missing:
        return
    say(f"installing on the host: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def _apt_sources() -> dict[str, str]:
    """The host's apt sources, copied into the guest so it uses the same mirrors."""
    sources: dict[str, str] = {}
    main = Path("/etc/apt/sources.list")
    if main.is_file():
        sources["sources.list"] = main.read_text()
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*")):
        # openmicrovm's own source (install.sh run on this host adds trixie) stays out: the guest
        # is a plain Debian 12 that install.sh has yet to touch, and without install.sh's pin
        # that source alone would make apt install trixie's python3 in the guest.
        if path.name.startswith("openmicrovm"):
            continue
        if path.suffix in (".list", ".sources") and path.is_file():
            sources[f"sources.list.d/{path.name}"] = path.read_text()
    return sources


def _certificates(bundle: Path) -> set[str]:
    if not bundle.is_file():
        return set()
    return set(
        re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", bundle.read_text(), re.DOTALL)
    )


def _trust_host_authorities(rootfs: Path) -> None:
    """The guest reaches the mirrors and PyPI through the host's network, which may intercept TLS
    with an authority only the host trusts (it does here): the guest trusts what the host trusts,
    and pip is told to use the system bundle, as the host's pip.conf does."""
    extra = sorted(
        _certificates(HOST_CA_BUNDLE) - _certificates(rootfs / "etc/ssl/certs/ca-certificates.crt")
    )
    for index, certificate in enumerate(extra):
        _write(rootfs / "usr/local/share/ca-certificates" / f"omv-host-{index}.crt", certificate + "\n")
    if extra:
        _run(["chroot", str(rootfs), "update-ca-certificates"])
    _write(rootfs / "etc/pip.conf", "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")


def _mirror(sources: dict[str, str]) -> str:
    for text in sources.values():
        for match in re.finditer(r"(?:^URIs:\s*|^deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text, re.MULTILINE):
            uri = match.group(1).rstrip("/")
            if uri.startswith("http") and uri.endswith("/debian"):
                return uri
    return DEFAULT_MIRROR


def recipe_hash() -> str:
    digest = hashlib.sha256()
    for path in [Path(__file__), BASE_ROOTFS_RECIPE, *sorted(GUEST_FILES.iterdir())]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(json.dumps(_apt_sources(), sort_keys=True).encode())
    digest.update("".join(sorted(_certificates(HOST_CA_BUNDLE))).encode())
    return digest.hexdigest()[:16]


def _image_at(directory: Path) -> Image:
    meta = json.loads((directory / "image.json").read_text())
    return Image(
        directory,
        directory / "vmlinuz",
        directory / "initrd.img",
        directory / "root.img",
        meta["kernel_version"],
    )


def cached_image() -> Image | None:
    directory = CACHE_ROOT / recipe_hash()
    return _image_at(directory) if (directory / "image.json").is_file() else None


class _Timer:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.times: dict[str, float] = {}

    def phase(self, name: str, action: Callable[[], None]) -> None:
        started = time.monotonic()
        action()
        self.times[name] = round(time.monotonic() - started, 1)
        self.say(f"image: {name} {self.times[name]:.1f} s")


def _download_kernel(debs: Path) -> None:
    depends = _run(["apt-cache", "depends", "linux-image-amd64"]).stdout
    match = re.search(r"Depends:\s*(linux-image-\S+-amd64)", depends)
    if match is None:
        raise RuntimeError(f"cannot tell which kernel linux-image-amd64 depends on:\n{depends}")
    _run(["apt-get", "download", match.group(1)], cwd=debs)


def _fetch_kernel(work: Path) -> str:
    debs = work / "debs"
    debs.mkdir()
    try:
        _download_kernel(debs)
    except RuntimeError:
        _run(["apt-get", "update", "-qq"])  # stale package lists may name a kernel the mirror dropped
        _download_kernel(debs)
    return _unpack_kernel(work)


def _unpack_kernel(work: Path) -> str:
    kernel_root = work / "kernel"
    for deb in (work / "debs").glob("*.deb"):
        _run(["dpkg-deb", "-x", str(deb), str(kernel_root)])
    modules = kernel_root / "lib" / "modules"
    versions = [path.name for path in modules.iterdir()]
    if len(versions) != 1:
        raise RuntimeError(f"expected one kernel in the package, found {versions}")
    version = versions[0]
    _run(["depmod", "-b", str(kernel_root), version])
    return version


def _module_file(kernel_root: Path, version: str, name: str) -> Path:
    base = kernel_root / "lib" / "modules" / version / "kernel"
    for suffix in (".ko", ".ko.xz"):
        found = list(base.rglob(name + suffix)) or list(base.rglob(name.replace("_", "-") + suffix))
        if found:
            return found[0]
    raise RuntimeError(f"kernel module {name} not found under {base}")


def _build_initramfs(work: Path, version: str, target: Path) -> None:
    tree = work / "initramfs"
    (tree / "bin").mkdir(parents=True)
    (tree / "modules").mkdir()
    shutil.copy2(BUSYBOX, tree / "bin" / "busybox")
    for name in INITRAMFS_MODULES:
        source = _module_file(work / "kernel", version, name)
        destination = tree / "modules" / f"{name}.ko"
        if source.suffix == ".xz":
            with open(destination, "wb") as out:
                subprocess.run(["xz", "-dc", str(source)], stdout=out, check=True)
        else:
            shutil.copy2(source, destination)
    (tree / "modules" / "order").write_text("\n".join(INITRAMFS_MODULES) + "\n")
    shutil.copy2(GUEST_FILES / "init", tree / "init")
    (tree / "init").chmod(0o755)
    files = subprocess.run(["find", "."], cwd=tree, capture_output=True, text=True, check=True).stdout
    cpio = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        cwd=tree,
        input=files.encode(),
        capture_output=True,
        check=True,
    )
    target.write_bytes(gzip.compress(cpio.stdout, compresslevel=1))


def _debootstrap(rootfs: Path, mirror: str) -> None:
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(GUEST_PACKAGES)}",
            SUITE,
            str(rootfs),
            mirror,
        ]
    )


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _configure(rootfs: Path, work: Path, version: str, sources: dict[str, str]) -> None:
    # Every module of the kernel, not only the initramfs's: the product needs nftables, veth,
    # overlay and the like, and udev loads virtio_net and 9p from here.
    modules = rootfs / "usr" / "lib" / "modules"
    modules.mkdir(parents=True, exist_ok=True)
    shutil.copytree(work / "kernel" / "lib" / "modules" / version, modules / version, symlinks=True)
    _run(["depmod", "-b", str(rootfs), version])
    _write(rootfs / "etc" / "hostname", "omv-guest\n")
    _write(rootfs / "etc" / "hosts", "127.0.0.1 localhost\n127.0.1.1 omv-guest\n::1 localhost\n")
    _write(rootfs / "etc" / "fstab", "/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    _write(
        rootfs / "etc" / "systemd" / "network" / "80-dhcp.network",
        "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n",
    )
    resolv = rootfs / "etc" / "resolv.conf"
    resolv.unlink(missing_ok=True)
    _write(resolv, "nameserver 10.0.2.3\n")
    apt = rootfs / "etc" / "apt"
    (apt / "sources.list").unlink(missing_ok=True)
    for name, text in sources.items():
        _write(apt / name, text)
    # An unattended apt run at boot would hold the dpkg lock that install.sh needs.
    _write(apt / "apt.conf.d" / "99omv-no-periodic", 'APT::Periodic::Enable "0";\n')
    _write(
        rootfs / "usr" / "local" / "sbin" / "omv-harness", (GUEST_FILES / "omv-harness").read_text(), 0o755
    )
    shutil.copy2(GUEST_FILES / "omv-harness.service", rootfs / "etc" / "systemd" / "system")
    _write(rootfs / "etc" / "machine-id", "")
    _trust_host_authorities(rootfs)
    chroot = ["chroot", str(rootfs)]
    _run([*chroot, "systemctl", "enable", "systemd-networkd", "systemd-networkd-wait-online", "omv-harness"])
    _run([*chroot, "systemctl", "mask", "apt-daily.timer", "apt-daily-upgrade.timer", "getty@tty1.service"])
    _run([*chroot, "useradd", "--create-home", "--shell", "/bin/bash", "alice"])
    _run([*chroot, "passwd", "--delete", "root"])


def _seed_base_rootfs(rootfs: Path, say: Callable[[str], None]) -> None:
    """The product's base root filesystem, made here by the product's own code into the guest's
    cache dir, as the guest's first deploy would have made it there.

    Why not leave it to the guest: it is a debootstrap, about a minute on a real host but ten
    under QEMU's software emulation, which would make the test measure the emulator rather than
    openmicrovm. The guest's deploy still imports it into buildah and builds on it; making it is
    covered by the suite on this host (tests/builder)."""
    sys.path.insert(0, str(CHECKOUT))
    try:
        from openmicrovm.builder.base_rootfs import ensure_base_rootfs
    finally:
        sys.path.remove(str(CHECKOUT))
    ensure_base_rootfs(rootfs / GUEST_PRODUCT_CACHE, lambda line: None)
    say("image: base root filesystem made in the guest's /var/cache/openmicrovm")


def _make_filesystem(rootfs: Path, target: Path) -> None:
    _run(["truncate", "-s", IMAGE_SIZE, str(target)])
    _run(["mkfs.ext4", "-q", "-L", "omv-root", "-d", str(rootfs), str(target)])


def _prune_other_images(keep: str) -> None:
    """Images of older recipes are never booted again: each is gigabytes of sparse disk."""
    for path in CACHE_ROOT.iterdir():
        if path.name != keep and re.fullmatch(r"[0-9a-f]{16}", path.name):
            remove_tree(path)


def build_image(say: Callable[[str], None]) -> Image:
    """The cached image for the current recipe, built first when there is none."""
    image = cached_image()
    if image is not None:
        return image
    key = recipe_hash()
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=CACHE_ROOT))
    try:
        timer = _Timer(say)
        sources = _apt_sources()
        output = work / "image"
        output.mkdir()
        versions: list[str] = []
        timer.phase("kernel", lambda: versions.append(_fetch_kernel(work)))
        version = versions[0]
        shutil.copy2(work / "kernel" / "boot" / f"vmlinuz-{version}", output / "vmlinuz")
        timer.phase("initramfs", lambda: _build_initramfs(work, version, output / "initrd.img"))
        rootfs = work / "rootfs"
        timer.phase("debootstrap", lambda: _debootstrap(rootfs, _mirror(sources)))
        timer.phase("configure", lambda: _configure(rootfs, work, version, sources))
        timer.phase("base rootfs", lambda: _seed_base_rootfs(rootfs, say))
        timer.phase("mkfs", lambda: _make_filesystem(rootfs, output / "root.img"))
        meta = {"kernel_version": version, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        meta["phase_seconds"] = timer.times  # type: ignore[assignment]
        (output / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
        final = CACHE_ROOT / key
        os.rename(output, final)
        _prune_other_images(key)
        return _image_at(final)
    finally:
        remove_tree(work)
