"""Bad input ends in an error that names the cause, and leaves nothing behind (the `driver`
fixture checks the host after every test)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from openmicrovm.runtime import (
    CapacityError,
    DriverError,
    PortNotListening,
    SnapshotError,
    make_driver,
)
from openmicrovm.runtime.base import BaseDriver
from openmicrovm.runtime.host import MIB, meminfo
from tests.runtime.conftest import run
from tests.runtime.helpers import app_spec, http


def test_missing_entrypoint(driver: BaseDriver, app_rootfs: Path) -> None:
    with pytest.raises(DriverError, match=r"entrypoint '/app/missing\.bin' does not exist in the image"):
        run(driver.start("microvm-noentry", app_spec(app_rootfs, argv=["/app/missing.bin"])))
    with pytest.raises(
        DriverError, match=r"entrypoint 'no-such-program' is not in the image \(searched PATH="
    ):
        run(driver.start("microvm-noentry", app_spec(app_rootfs, argv=["no-such-program"])))
    with pytest.raises(DriverError, match="user 'ghost' is not in the image's /etc/passwd"):
        run(driver.start("microvm-noentry", app_spec(app_rootfs, user="ghost")))


def test_missing_rootfs_and_bad_ids(driver: BaseDriver, app_rootfs: Path, tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="does not exist"):
        run(driver.start("microvm-norootfs", app_spec(tmp_path / "nothing-here")))
    with pytest.raises(DriverError, match="invalid sandbox id"):
        run(driver.start("../escape", app_spec(app_rootfs)))


def test_an_app_that_exits_at_once(driver: BaseDriver, app_rootfs: Path) -> None:
    spec = app_spec(app_rootfs, argv=["sh", "-c", "echo boom: missing configuration >&2; exit 3"])

    async def scenario() -> None:
        # Depending on how fast the app dies, start() reports it or the first connect does.
        sandbox = None
        try:
            sandbox = await driver.start("microvm-exits", spec)
            await http(driver, sandbox, wait=5)
        finally:
            if sandbox is not None:
                await driver.destroy(sandbox)

    with pytest.raises(
        DriverError, match=r"exited with status 3; last output: .*boom: missing configuration"
    ):
        run(scenario())


def test_an_app_that_cannot_be_executed(driver: BaseDriver, app_rootfs: Path) -> None:
    """The file exists but is not a program the sandbox can run (the agent reports exec's error)."""
    spec = app_spec(app_rootfs, argv=["/app/app.py"])  # not executable
    with pytest.raises(DriverError, match="not an executable file"):
        run(driver.start("microvm-noexec", spec))
    spec = app_spec(app_rootfs, argv=["/usr/bin/python3", "/app/app.py"])
    spec = type(spec)(
        **{**spec.__dict__, "process": type(spec.process)(["/usr/bin/python3"], workdir="/nowhere")}
    )
    with pytest.raises(DriverError, match="working directory '/nowhere' does not exist"):
        run(driver.start("microvm-noexec", spec))


def test_an_app_that_never_listens(driver: BaseDriver, app_rootfs: Path) -> None:
    async def scenario() -> None:
        sandbox = await driver.start("microvm-silent", app_spec(app_rootfs, argv=["sleep", "infinity"]))
        try:
            with pytest.raises(PortNotListening, match="port 8080"):
                await driver.connect(sandbox, 8080)
            assert (await driver.app_status(sandbox)).state == "running"
        finally:
            await driver.destroy(sandbox)

    run(scenario())


def test_a_sandbox_id_in_use(driver: BaseDriver, app_rootfs: Path) -> None:
    async def scenario() -> None:
        sandbox = await driver.start("microvm-twice", app_spec(app_rootfs))
        try:
            with pytest.raises(DriverError, match="sandbox microvm-twice already exists"):
                await driver.start("microvm-twice", app_spec(app_rootfs))
            status, _ = await http(driver, sandbox)  # the first one is unharmed
            assert status == 200
        finally:
            await driver.destroy(sandbox)

    run(scenario())


def test_broken_snapshots_and_a_host_short_of_memory(
    driver: BaseDriver, app_rootfs: Path, tmp_path: Path, cache_dir: Path
) -> None:
    good = tmp_path / "good"

    async def take_snapshot() -> None:
        sandbox = await driver.start("build-broken", app_spec(app_rootfs))
        try:
            await http(driver, sandbox)
            await driver.snapshot(sandbox, good)
        except BaseException:
            await driver.destroy(sandbox)
            raise

    run(take_snapshot())

    with pytest.raises(SnapshotError, match="does not exist"):
        run(driver.restore("microvm-a", tmp_path / "no-such-snapshot"))

    not_empty = tmp_path / "not-empty"
    not_empty.mkdir()
    (not_empty / "something").write_text("x")
    with pytest.raises(SnapshotError, match="is not empty"):
        run(driver.snapshot(driver.load("nothing") or _dummy(driver, app_rootfs), not_empty))

    corrupt_meta = tmp_path / "corrupt-meta"
    shutil.copytree(good, corrupt_meta)
    (corrupt_meta / "snapshot.json").write_text("{ this is not json")
    with pytest.raises(SnapshotError, match="is corrupt"):
        run(driver.restore("microvm-b", corrupt_meta))

    incomplete = tmp_path / "incomplete"
    shutil.copytree(good, incomplete)
    (incomplete / "snapshot.json").unlink()
    with pytest.raises(SnapshotError, match=r"incomplete: snapshot\.json is missing"):
        run(driver.restore("microvm-c", incomplete))

    if driver.capabilities.memory_snapshot:
        garbage = tmp_path / "garbage-image"
        shutil.copytree(good, garbage)
        image = garbage / "memory" / "checkpoint.img"
        image.write_bytes(b"\x00garbage" * 4096)
        with pytest.raises(SnapshotError, match="cannot restore from snapshot"):
            run(driver.restore("microvm-d", garbage))
        truncated = tmp_path / "truncated-image"
        shutil.copytree(good, truncated)
        image = truncated / "memory" / "checkpoint.img"
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
        with pytest.raises(SnapshotError, match="cannot restore from snapshot"):
            run(driver.restore("microvm-e", truncated))
    else:
        no_layer = tmp_path / "no-layer"
        shutil.copytree(good, no_layer)
        shutil.rmtree(no_layer / "upper")
        with pytest.raises(SnapshotError, match="the upper layer is missing"):
            run(driver.restore("microvm-d", no_layer))

    # A host that keeps more memory for itself than it has: every restore is refused up front.
    total_mib = meminfo()["MemTotal"] // MIB
    tight = make_driver(driver.name, driver.state_root, cache_dir, memory_reserve_mib=total_mib)
    with pytest.raises(
        CapacityError, match=r"not enough memory on the host to restore a sandbox: \d+ MiB available"
    ):
        run(tight.restore("microvm-f", good))
    with pytest.raises(CapacityError, match="not enough memory on the host to start a sandbox"):
        run(tight.start("microvm-g", app_spec(app_rootfs)))

    # The good snapshot still restores.
    async def restore_good() -> None:
        sandbox = await driver.restore("microvm-h", good)
        try:
            status, _ = await http(driver, sandbox)
            assert status == 200
        finally:
            await driver.destroy(sandbox)

    run(restore_good())


def _dummy(driver: BaseDriver, rootfs: Path) -> object:
    """A handle for a sandbox that does not exist: snapshot() must refuse the directory first."""
    from openmicrovm.runtime import Sandbox

    spec = app_spec(rootfs)
    record = driver.record_type(
        "nothing", driver.name, spec, "0" * 12, "0" * 32, "/nonexistent", state="running"
    )
    return Sandbox("nothing", driver.name, driver.state_dir("nothing"), spec, {"record": record})


def test_unknown_driver_name(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(DriverError, match="unknown sandbox driver 'firecracker'"):
        make_driver("firecracker", tmp_path, cache_dir)
