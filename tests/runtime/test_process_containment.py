"""The process driver does not give an app host root (security issue 11, item 3).

Each test is an escape an app could try from a real process-driver sandbox, as root inside it:
its root must not be host root (a user namespace), the calls that reach the host's kernel
administration must fail (seccomp), no disk may be reachable through a device node (a minimal /dev
and the devices cgroup), and the image's and the layer's files must show the app its own ids.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from openmicrovm.idmap import ID_BASE, ID_COUNT
from openmicrovm.runtime import agent_build, cgroups, seccomp
from openmicrovm.runtime.base import BaseDriver
from openmicrovm.runtime.process import DEVICE_RULES, LAYER, LAYER_IDS_FILE
from tests.runtime.conftest import run
from tests.runtime.helpers import app_spec, http, only_driver, run_command


@pytest.fixture
def driver_name() -> str:
    """Only the process driver: these are its walls (gVisor has its own kernel)."""
    return only_driver("process")


# Run inside the sandbox: each named system call, made directly, and the errno it got.
SYSCALL_PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    libc = ctypes.CDLL(None, use_errno=True)
    results = {}
    for name, number, args in json.loads(sys.argv[1]):
        ctypes.set_errno(0)
        value = libc.syscall(number, *[ctypes.c_long(a) for a in args])
        results[name] = "ok" if value >= 0 else f"errno {ctypes.get_errno()}"
    print("PROBE " + json.dumps(results), flush=True)
    """
)


async def probe_calls(
    driver: BaseDriver, sandbox: object, calls: list[tuple[str, list[int]]]
) -> dict[str, str]:
    numbers = seccomp.SYSCALLS[seccomp.machine()]
    request = json.dumps([(name, numbers[name], args) for name, args in calls])
    status, output = await run_command(driver, sandbox, ["python3", "-c", SYSCALL_PROBE, request])  # type: ignore[arg-type]
    assert status == 0, output
    line = next(line for line in output.splitlines() if line.startswith("PROBE "))
    return dict(json.loads(line[len("PROBE ") :]))


def test_app_root_is_an_unprivileged_host_user(driver: BaseDriver, app_rootfs: Path) -> None:
    async def scenario() -> None:
        sandbox = await driver.start("microvm-userns", app_spec(app_rootfs))
        try:
            status, body = await http(driver, sandbox)
            assert status == 200 and body["uid"] == 0  # root in its own eyes
            status, output = await run_command(
                driver, sandbox, ["cat", "/proc/self/uid_map", "/proc/self/gid_map"]
            )
            assert status == 0, output
            assert output.split() == ["0", str(ID_BASE), str(ID_COUNT)] * 2
            # Seen from the host, every process of the sandbox runs as a shifted id; all but one,
            # outside the sandbox's namespaces: the omv-shim keeper that reaps them, running the
            # host's shim binary (which nothing inside can reach), in the cgroup on purpose.
            shim = agent_build.binary_path(driver.cache_dir, agent_build.SHIM)
            pids = [
                pid for pid in driver.cgroup_of(sandbox).pids() if Path(f"/proc/{pid}/exe").resolve() != shim
            ]
            assert pids
            for pid in pids:
                uids = Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split("\n")[0].split()
                assert all(ID_BASE <= int(uid) < ID_BASE + ID_COUNT for uid in uids), (pid, uids)
            # What app root writes is owned on the host by ID_BASE, not by root.
            await http(driver, sandbox, "/write?path=/srv/by-root.txt&text=x")
            status, output = await run_command(
                driver,
                sandbox,
                [
                    "sh",
                    "-c",
                    "touch /tmp/by-app && chown 1000:1000 /tmp/by-app && stat -c %u:%g /tmp/by-app /",
                ],
            )
            assert status == 0, output
            assert output.split() == ["1000:1000", "0:0"]  # the image's ids inside, / included
            upper = sandbox.state_dir / LAYER
            assert (upper / "srv" / "by-root.txt").stat().st_uid == ID_BASE
            assert (upper / "tmp" / "by-app").stat().st_uid == ID_BASE + 1000
            # The image's files show with its own ids, not as nobody.
            status, output = await run_command(
                driver, sandbox, ["stat", "-c", "%U:%G", "/etc/passwd", "/app/app.py"]
            )
            assert output.split() == ["root:root", "root:root"], output
        finally:
            await driver.destroy(sandbox)

    run(scenario())


def test_namespace_mount_and_kernel_calls_are_refused(driver: BaseDriver, app_rootfs: Path) -> None:
    """`unshare -U` would give the app every capability over a namespace of its own, `mount` a new
    view of the filesystem; module loading, keyrings, BPF, perf, io_uring and userfaultfd are kernel
    attack surface: all get EPERM. Ordinary programs (threads included, which need clone3's ENOSYS
    fallback) keep working."""

    async def scenario() -> None:
        sandbox = await driver.start("microvm-seccomp", app_spec(app_rootfs))
        try:
            status, output = await run_command(driver, sandbox, ["grep", "^Seccomp:", "/proc/self/status"])
            assert output.split() == ["Seccomp:", "2"], output
            for argv in (
                ["unshare", "-U", "true"],
                ["unshare", "-m", "true"],
                ["mount", "-t", "tmpfs", "none", "/mnt"],
                ["mount", "--bind", "/app", "/mnt"],
            ):
                status, output = await run_command(driver, sandbox, argv)
                assert status != 0, (argv, output)
                assert "not permitted" in output or "permission denied" in output.lower(), (argv, output)
            eperm = f"errno {errno.EPERM}"
            results = await probe_calls(
                driver,
                sandbox,
                [
                    ("unshare", [0x10000000]),  # CLONE_NEWUSER
                    ("clone", [0x10000000 | 17, 0, 0, 0, 0]),  # a child in a new user namespace
                    ("setns", [0, 0]),
                    ("mount", [0, 0, 0, 0, 0]),
                    ("keyctl", [0, 0, 0, 0, 0]),
                    ("add_key", [0, 0, 0, 0, 0]),
                    ("bpf", [0, 0, 0]),
                    ("perf_event_open", [0, 0, -1, -1, 0]),
                    ("init_module", [0, 0, 0]),
                    ("finit_module", [0, 0, 0]),
                    ("delete_module", [0, 0]),
                    ("kexec_load", [0, 0, 0, 0]),
                    ("io_uring_setup", [1, 0]),
                    ("userfaultfd", [0]),
                    ("open_by_handle_at", [0, 0, 0]),
                    ("fsopen", [0, 0]),
                    ("open_tree", [0, 0, 0]),
                    ("reboot", [0, 0, 0, 0]),
                    ("swapon", [0, 0]),
                    ("clock_settime", [0, 0]),
                    ("socket", [40, 1, 0]),  # AF_VSOCK
                    ("clone3", [0, 0]),
                ],
            )
            expected = {name: eperm for name in results} | {"clone3": f"errno {errno.ENOSYS}"}
            assert results == expected
            script = (
                "import threading, subprocess; t = threading.Thread(target=print, args=('thread ok',)); "
                "t.start(); t.join(); print(subprocess.run(['echo', 'child ok'], capture_output=True, text=True).stdout)"
            )
            status, output = await run_command(driver, sandbox, ["python3", "-c", script])
            assert status == 0 and "thread ok" in output and "child ok" in output, output
            status, _ = await http(driver, sandbox)
            assert status == 200
        finally:
            await driver.destroy(sandbox)

    run(scenario())


def test_no_device_node_reaches_a_disk(driver: BaseDriver, app_rootfs: Path) -> None:
    """/dev holds only the harmless devices; no block device can be made; and one planted in the
    sandbox's own layer from the host (as a layer with device nodes would) cannot be opened."""
    disk = os.stat("/").st_dev  # the host's root filesystem's block device

    async def scenario() -> None:
        sandbox = await driver.start("microvm-devices", app_spec(app_rootfs))
        try:
            status, output = await run_command(driver, sandbox, ["ls", "-A", "/dev"])
            assert status == 0, output
            assert set(output.split()) <= {
                *("null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm"),
                *("stdin", "stdout", "stderr", "fd", "core"),
            }, output
            major, minor = os.major(disk), os.minor(disk)
            for path in ("/dev/sda", "/tmp/disk"):
                status, output = await run_command(
                    driver, sandbox, ["mknod", path, "b", str(major), str(minor)]
                )
                assert status != 0 and "not permitted" in output, output
            status, output = await run_command(
                driver, sandbox, ["sh", "-c", "find / /dev -xdev -type b; echo end"]
            )
            assert output.split() == ["end"], output
            planted = sandbox.state_dir / LAYER / "planted-disk"
            os.mknod(planted, 0o666 | stat.S_IFBLK, disk)
            status, output = await run_command(driver, sandbox, ["head", "-c", "512", "/planted-disk"])
            assert status != 0, output
            assert "denied" in output or "not permitted" in output, output
            if driver.devices_mount is not None:  # type: ignore[attr-defined]
                rules = (
                    driver.devices_mount / driver.cgroup_of(sandbox).relative / "devices.list"
                ).read_text()  # type: ignore[attr-defined]
                assert sorted(rules.split("\n")[:-1]) == sorted(DEVICE_RULES)
        finally:
            await driver.destroy(sandbox)

    run(scenario())


def test_the_host_kernel_settings_stay_out_of_reach(driver: BaseDriver, app_rootfs: Path) -> None:
    async def scenario() -> None:
        sandbox = await driver.start("microvm-sysctl", app_spec(app_rootfs))
        try:
            for target in (
                "/proc/sys/kernel/core_pattern",
                "/proc/sysrq-trigger",
                "/proc/sys/vm/drop_caches",
            ):
                status, output = await run_command(driver, sandbox, ["sh", "-c", f"echo 1 > {target}"])
                assert status != 0, (target, output)
            status, output = await run_command(driver, sandbox, ["grep", "^CapEff", "/proc/self/status"])
            assert int(output.split()[1], 16) >> 21 & 1 == 0  # no CAP_SYS_ADMIN, even in the namespace
        finally:
            await driver.destroy(sandbox)

    run(scenario())


@pytest.fixture(scope="module")
def shifted_rootfs(app_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The test image as a build in a user namespace exports it: container id N is host id
    ID_BASE + N (a copy: the image's hard links must not be chowned)."""
    root = tmp_path_factory.mktemp("shifted") / "rootfs"
    subprocess.run(["cp", "-a", f"{app_rootfs}/.", f"{root}/"], check=True)
    try:
        from openmicrovm.runtime.process import shift_layer_ids

        shift_layer_ids(root)
        os.chown(root / "app", ID_BASE + 1000, ID_BASE + 1000)
        yield root
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)


def test_an_image_owned_by_shifted_ids_shows_container_ids(driver: BaseDriver, shifted_rootfs: Path) -> None:
    async def scenario() -> None:
        sandbox = await driver.start("microvm-shifted", app_spec(shifted_rootfs, rootfs_id_base=ID_BASE))
        try:
            status, output = await run_command(
                driver, sandbox, ["stat", "-c", "%u:%g", "/", "/etc/passwd", "/app"]
            )
            assert output.split() == ["0:0", "0:0", "1000:1000"], output
            status, body = await http(driver, sandbox, "/write?path=/app/note&text=x")
            assert status == 200, body  # app root may write in a directory of user 1000 (CAP_DAC_OVERRIDE)
            assert (sandbox.state_dir / LAYER / "app" / "note").stat().st_uid == ID_BASE
        finally:
            await driver.destroy(sandbox)
        assert not (shifted_rootfs / "app" / "note").exists()

    run(scenario())


def test_a_snapshot_from_before_the_user_namespace_restores_with_its_ids(
    driver: BaseDriver, app_rootfs: Path, tmp_path: Path
) -> None:
    """Snapshots made by the process driver before it had a user namespace hold a layer owned by
    plain ids and no LAYER_IDS_FILE; a restore shifts the copy's ids, so the app owns its files."""

    async def scenario() -> None:
        sandbox = await driver.start("build-old", app_spec(app_rootfs))
        try:
            await http(driver, sandbox, "/write?path=/srv/old.txt&text=from-before")
            snapshot = tmp_path / "snap"
            await driver.snapshot(sandbox, snapshot)
        except BaseException:
            await driver.destroy(sandbox)
            raise
        assert (snapshot / LAYER_IDS_FILE).read_text().strip() == str(ID_BASE)
        # Make it an old one: no marker, every id plain, a file only root may change.
        (snapshot / LAYER_IDS_FILE).unlink()
        for path in [snapshot / LAYER, *(snapshot / LAYER).rglob("*")]:
            info = path.lstat()
            os.lchown(path, info.st_uid - ID_BASE, info.st_gid - ID_BASE)
        os.chmod(snapshot / LAYER / "srv" / "old.txt", 0o600)
        restored = await driver.restore("microvm-old", snapshot)
        try:
            status, output = await run_command(
                driver,
                sandbox=restored,
                argv=["sh", "-c", "stat -c %u:%g /srv/old.txt && echo more >> /srv/old.txt"],
            )
            assert status == 0 and output.split() == ["0:0"], output
            assert (snapshot / LAYER / "srv" / "old.txt").stat().st_uid == 0  # the snapshot is not changed
        finally:
            await driver.destroy(restored)

    run(scenario())


def test_cgroup_limits_freeze_and_stats_still_apply(driver: BaseDriver, app_rootfs: Path) -> None:
    """The cgroups are joined from outside the user namespace: limits, freezing (suspend) and usage
    work as before, and the app cannot see or change them (no cgroupfs inside)."""

    async def scenario() -> None:
        sandbox = await driver.start("microvm-cgroup", app_spec(app_rootfs, memory_mib=256, pids_max=64))
        try:
            cgroup = driver.cgroup_of(sandbox)
            layout = driver.layout
            if layout.version == 1:
                limit = int(
                    (layout.controller_dir("memory", cgroup.relative) / "memory.limit_in_bytes").read_text()
                )
            else:
                limit = int((layout.controller_dir("memory", cgroup.relative) / "memory.max").read_text())
            assert limit == 256 * 1024 * 1024
            stats = await driver.stats(sandbox)
            assert stats.rss_bytes > 0 and stats.cpu_seconds > 0
            await driver.suspend(sandbox)
            assert cgroup.is_frozen()
            await driver.resume(sandbox)
            status, _ = await http(driver, sandbox)
            assert status == 200
            status, output = await run_command(
                driver, sandbox, ["sh", "-c", "ls /sys/fs/cgroup 2>&1; echo 999999 > /sys/fs/cgroup/pids.max"]
            )
            assert status != 0, output
            assert cgroups.Cgroup(layout, cgroup.relative).pids()
        finally:
            await driver.destroy(sandbox)

    run(scenario())
