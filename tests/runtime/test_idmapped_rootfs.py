"""Images owned by shifted host ids (SandboxSpec.rootfs_id_base), as builds in a user namespace
export them: the gvisor driver shows them to the app with container ids through an idmapped mount
(omv-idmap), at start and at every kind of restore, and the host's copy is never written to."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from openmicrovm.idmap import ID_BASE, ID_COUNT
from openmicrovm.runtime import DriverError, Sandbox, agent_build, make_driver
from openmicrovm.runtime.base import BaseDriver
from openmicrovm.runtime.records import record_of
from tests.runtime.conftest import run
from tests.runtime.helpers import app_spec, http, only_driver, run_command, warm_pool_key

APP_UID = 1000  # a container user that owns files in the test images
SUID_ID = "/usr/local/bin/suid-id"  # a setuid-root copy of id(1) added to the test images
OWNED_DIR = "/home/app"  # owned by APP_UID in the image


@pytest.fixture
def driver_name() -> str:
    """Only the gvisor driver: the process driver shows shifted images its own way."""
    return only_driver("gvisor")


def owners(root: Path) -> dict[str, tuple[int, int, int, int, int]]:
    """Every entry under root with its mode, owner, group, size and mtime."""
    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            entries[os.path.relpath(path, root)] = (
                info.st_mode,
                info.st_uid,
                info.st_gid,
                info.st_size,
                info.st_mtime_ns,
            )
    return entries


def shift_owners(root: Path, by: int) -> None:
    """Add `by` to the owner and group of every entry under root (root included), keeping every
    mode bit: chown clears setuid and setgid, so the mode is set again afterwards."""
    paths = [str(root)]
    for directory, dirs, files in os.walk(root):
        paths += [os.path.join(directory, name) for name in dirs + files]
    for path in paths:
        info = os.lstat(path)
        os.lchown(path, info.st_uid + by, info.st_gid + by)
        if not stat.S_ISLNK(info.st_mode):
            os.chmod(path, stat.S_IMODE(info.st_mode))


Manifest = dict[str, tuple[int, int, int, int, int]]


@dataclass(frozen=True)
class Images:
    """The test image with a directory of container user APP_UID and a setuid-root program, twice:
    owned by plain container ids (as images were before builds ran in a user namespace) and owned
    as a build in a user namespace leaves it (container id N is host id ID_BASE + N); with the
    shifted copy's manifest, ownership included, to prove that nothing wrote to it."""

    plain: Path
    shifted: Path
    shifted_manifest: Manifest

    def assert_shifted_untouched(self) -> None:
        changed = sorted(set(owners(self.shifted).items()) ^ set(self.shifted_manifest.items()))
        assert not changed, f"the shifted image was written to: {changed[:10]}"


@pytest.fixture(scope="module")
def images(app_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    work = tmp_path_factory.mktemp("idmapped")
    plain, shifted = work / "plain", work / "shifted"
    try:
        plain.mkdir()
        subprocess.run(["cp", "-a", f"{app_rootfs}/.", str(plain)], check=True)
        owned = plain / OWNED_DIR.lstrip("/")
        owned.mkdir(parents=True, exist_ok=True)
        (owned / "owned.txt").write_text("mine\n")
        for path in (owned, owned / "owned.txt"):
            os.chown(path, APP_UID, APP_UID)
        suid = plain / SUID_ID.lstrip("/")
        shutil.copy2(plain / "usr/bin/id", suid)
        os.chown(suid, 0, 0)
        suid.chmod(0o4755)
        shifted.mkdir()
        subprocess.run(["cp", "-a", f"{plain}/.", str(shifted)], check=True)
        shift_owners(shifted, ID_BASE)
        assert os.lstat(shifted / "etc/passwd").st_uid == ID_BASE
        assert os.lstat(shifted / SUID_ID.lstrip("/")).st_mode & stat.S_ISUID
        yield Images(plain, shifted, owners(shifted))
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def shell(driver: BaseDriver, sandbox: Sandbox, script: str) -> str:
    status, output = await run_command(driver, sandbox, ["sh", "-c", script])
    assert status == 0, output
    return output


# ---------------------------------------------------------------------- omv-idmap itself


def run_in_private_mounts(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """script (sh, with args as $1...) in a private mount namespace that ends with it: whatever
    it mounts is gone afterwards, whether it succeeded or not."""
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_omv_idmap_shows_shifted_owners_read_only(tmp_path: Path, cache_dir: Path) -> None:
    tool = str(run(agent_build.ensure_idmap(cache_dir)))
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    for name, uid, gid in (
        ("root", ID_BASE, ID_BASE),
        ("user", ID_BASE + 1000, ID_BASE + 1001),
        ("outside", 5, 5),
    ):
        (source / name).write_text(name)
        os.chown(source / name, uid, gid)
    (source / "root").chmod(0o4755)

    shown = run_in_private_mounts(
        '"$1" "$2" "$3" "$4" 0 "$5" && cd "$3" && stat -c "%n %u %g %A" root user outside && '
        'grep -F " $3 " /proc/self/mountinfo && { touch new 2>/dev/null && echo WRITABLE || echo READ-ONLY; }',
        tool,
        str(source),
        str(target),
        str(ID_BASE),
        str(ID_COUNT),
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    # Ids outside the range show as the overflow id; the setuid bit is shown as it is stored.
    assert lines[:3] == ["root 0 0 -rwsr-xr-x", "user 1000 1001 -rw-r--r--", "outside 65534 65534 -rw-r--r--"]
    mount_options = lines[3].split()[5].split(",")
    assert {"ro", "nosuid", "nodev", "idmapped"} <= set(mount_options), lines[3]
    assert lines[4] == "READ-ONLY"
    assert not (source / "new").exists()

    # The other direction (plain container ids shown as shifted ones), writable when asked.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "file").write_text("x")
    os.chown(plain / "file", 1000, 1000)
    os.chown(plain, ID_BASE, ID_BASE)  # shown as ID_BASE + ID_BASE: outside the range
    reverse = run_in_private_mounts(
        '"$1" --rw "$2" "$3" 0 "$4" "$5" && stat -c "%u %g" "$3/file" && grep -F " $3 " /proc/self/mountinfo',
        tool,
        str(plain),
        str(target),
        str(ID_BASE),
        str(ID_COUNT),
    )
    assert reverse.returncode == 0, reverse.stderr
    first, mountinfo = reverse.stdout.splitlines()
    assert first == f"{ID_BASE + 1000} {ID_BASE + 1000}"
    assert "rw" in mountinfo.split()[5].split(",")

    # Nothing stays mounted on the host, and the source kept its owners.
    assert str(target) not in Path("/proc/self/mountinfo").read_text()
    assert os.lstat(source / "root").st_uid == ID_BASE and os.listdir(target) == []


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["a", "b", "1", "2"],
        ["a", "b", "1", "2", "0"],  # an empty range
        ["a", "b", "-1", "2", "3"],
        ["a", "b", "4294967295", "0", "1"],  # (uid_t)-1 is no id
        ["a", "b", "4294967290", "0", "65536"],  # past the last id
        ["--ro", "a", "b", "1", "2", "3"],
    ],
)
def test_omv_idmap_refuses_bad_usage(cache_dir: Path, tmp_path: Path, args: list[str]) -> None:
    tool = str(run(agent_build.ensure_idmap(cache_dir)))
    result = subprocess.run([tool, *args], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    assert "usage: omv-idmap" in result.stderr


def test_omv_idmap_reports_a_missing_source(cache_dir: Path, tmp_path: Path) -> None:
    tool = str(run(agent_build.ensure_idmap(cache_dir)))
    (tmp_path / "target").mkdir()
    result = run_in_private_mounts(
        '"$1" "$2" "$3" 0 1 10', tool, str(tmp_path / "missing"), str(tmp_path / "target")
    )
    assert result.returncode == 1
    assert "cannot clone the mount at" in result.stderr and "No such file" in result.stderr


# ---------------------------------------------------------------------- gvisor sandboxes


# What the app sees of the image, and what its users may do there. The image's setuid program is
# run by a container user: this runsc applies no setuid bit on exec (gVisor b/30815691), so it
# runs as that user, and what matters here is that a shifted image behaves as an unshifted one.
AS_USER = f"setpriv --reuid {APP_UID} --regid {APP_UID} --clear-groups"
VIEW = (
    f"stat -c '%n %u %g' /etc/passwd /usr {OWNED_DIR}/owned.txt; stat -c %A {SUID_ID}; "
    "{ echo x > /etc/by-root && echo ROOT-WRITES-ETC; } 2>/dev/null; "
    f"{AS_USER} sh -c '{{ echo x > {OWNED_DIR}/new && echo USER-WRITES-OWN; }} 2>/dev/null; "
    "{ echo x > /etc/by-user && echo USER-WRITES-ETC; } 2>/dev/null'; "
    f"echo suid-euid $({AS_USER} {SUID_ID} -u) ruid $({AS_USER} {SUID_ID} -ru)"
)
EXPECTED_VIEW = [
    "/etc/passwd 0 0",
    "/usr 0 0",
    f"{OWNED_DIR}/owned.txt {APP_UID} {APP_UID}",
    "-rwsr-xr-x",
    "ROOT-WRITES-ETC",
    "USER-WRITES-OWN",
]


def test_a_shifted_image_looks_like_the_unshifted_one(driver: BaseDriver, images: Images) -> None:
    """The same image, owned by plain ids (rootfs_id_base=0, no idmapped mount) and by shifted
    ones (rootfs_id_base=ID_BASE): the app sees the same owners, modes and permissions in both."""

    async def view(name: str, root: Path, id_base: int) -> list[str]:
        # Every capability: without it no_new_privs is set, and no setuid bit could take effect.
        spec = app_spec(root, rootfs_id_base=id_base, all_capabilities=True)
        sandbox = await driver.start(name, spec)
        try:
            lines = (await shell(driver, sandbox, VIEW)).splitlines()
            # The app (root) writes to a root-owned directory, into the sandbox's own layer.
            status, _ = await http(driver, sandbox, "/write?path=/etc/omv-note&text=written-inside")
            assert status == 200
            _, note = await http(driver, sandbox, "/read?path=/etc/omv-note")
            assert note == {"text": "written-inside"}
            return lines
        finally:
            await driver.destroy(sandbox)

    async def scenario() -> None:
        plain = await view("microvm-plain", images.plain, 0)
        shifted = await view("microvm-shifted", images.shifted, ID_BASE)
        assert shifted[: len(EXPECTED_VIEW)] == EXPECTED_VIEW, shifted
        assert shifted[len(EXPECTED_VIEW)].startswith("suid-euid "), shifted
        assert shifted[len(EXPECTED_VIEW)].endswith(f" ruid {APP_UID}"), shifted
        assert shifted == plain  # the setuid program's effective uid included

    run(scenario())
    for root in (images.plain, images.shifted):
        for written in ("etc/omv-note", "etc/by-root", "etc/by-user", f"{OWNED_DIR.lstrip('/')}/new"):
            assert not (root / written).exists()
    images.assert_shifted_untouched()


def test_without_the_id_base_a_shifted_image_shows_host_ids(driver: BaseDriver, images: Images) -> None:
    """The control for the test above: rootfs_id_base=0 shows the files as they are stored, so the
    container ids there come from the idmapped mount."""

    async def scenario() -> None:
        sandbox = await driver.start("microvm-unmapped", app_spec(images.shifted))
        try:
            owner = await shell(driver, sandbox, "stat -c %u /etc/passwd")
        finally:
            await driver.destroy(sandbox)
        assert owner.strip() == str(ID_BASE)

    run(scenario())
    images.assert_shifted_untouched()


def test_an_id_base_without_room_for_the_range_is_refused(driver: BaseDriver, images: Images) -> None:
    spec = app_spec(images.shifted, rootfs_id_base=2**32 - 10)
    with pytest.raises(DriverError, match="rootfs_id_base"):
        run(driver.start("microvm-badbase", spec))


def test_snapshots_of_a_shifted_image_restore_with_container_ids(
    driver: BaseDriver,
    images: Images,
    tmp_path: Path,
    cache_dir: Path,
) -> None:
    """A restore (fresh, from the warm pool, and from suspend-to-disk) mounts the root as the start
    did: the checkpoint continues with the same files and the same owners."""
    root = images.shifted
    view = f"stat -c '%n %u %g' /etc/passwd {OWNED_DIR}/owned.txt"
    expected_view = ["/etc/passwd 0 0", f"{OWNED_DIR}/owned.txt {APP_UID} {APP_UID}"]

    async def check(box: Sandbox, count: int) -> None:
        _, body = await http(driver, box)
        assert body["count"] == count
        _, note = await http(driver, box, "/read?path=/etc/omv-note")
        assert note == {"text": "before-snapshot"}
        assert (await shell(driver, box, view)).split("\n")[:2] == expected_view
        status, _ = await http(driver, box, "/write?path=/etc/after-restore&text=x")
        assert status == 200

    async def scenario() -> None:
        sandbox = await driver.start("build-idmapped", app_spec(root, rootfs_id_base=ID_BASE))
        try:
            await http(driver, sandbox)
            await http(driver, sandbox, "/write?path=/etc/omv-note&text=before-snapshot")
            await driver.snapshot(sandbox, tmp_path / "snap")
        except BaseException:
            await driver.destroy(sandbox)
            raise
        restored = []
        try:
            for name in ("microvm-i1", "microvm-i2"):  # the second restore makes the snapshot hot
                box = await driver.restore(name, tmp_path / "snap")
                restored.append(box)
                await check(box, 2)
            warm_key = await warm_pool_key(driver)  # the pool fills in the background
            pooled = await driver.restore("microvm-i3", tmp_path / "snap")
            restored.append(pooled)
            assert record_of(pooled).key == warm_key  # handed out from the pool
            await check(pooled, 2)
            to_disk = make_driver(driver.name, driver.state_root, cache_dir, suspend_to_disk_after=0)
            await to_disk.suspend(pooled)
            assert record_of(pooled).suspended_in == "disk"
            await to_disk.resume(pooled)
            await check(pooled, 3)
        finally:
            for box in restored:
                await driver.destroy(box)

    run(scenario())
    images.assert_shifted_untouched()
