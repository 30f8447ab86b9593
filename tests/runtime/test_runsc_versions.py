"""The gvisor driver and the runsc versions it may meet: which binary it runs, asyncio apps (an
epoll instance watching a listening socket, which runsc 2022 cannot checkpoint), and snapshots
made by another runsc than the default one."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from openmicrovm.config import load_settings
from openmicrovm.runtime import DriverError, SnapshotError, make_driver, runsc
from openmicrovm.runtime.base import BaseDriver
from openmicrovm.runtime.gvisor import GVisorDriver
from openmicrovm.runtime.gvisor.checkpoint import MEMORY_IMAGE, SNAPSHOT_AGENT
from openmicrovm.runtime.gvisor.options import GVisorOptions
from openmicrovm.runtime.gvisor.records import GVisorSnapshotMeta
from openmicrovm.runtime.records import SNAPSHOT_FILE, record_of
from tests.runtime.conftest import run
from tests.runtime.helpers import app_spec, http

# asyncio.start_server: the listening socket sits in the event loop's epoll instance, as in every
# aiohttp, uvicorn or FastAPI app. State in memory, as the stdlib app of the other tests.
ASYNCIO_APP = textwrap.dedent(
    """
    import asyncio, json, random

    TOKEN = random.randrange(10**12)
    count = 0
    hoard = bytearray(8 << 20)  # memory that must come back with the snapshot
    hoard[::4096] = b"x" * len(hoard[::4096])


    async def handle(reader, writer):
        global count
        request = await reader.readuntil(b"\\r\\n\\r\\n")
        count += 1
        body = json.dumps({"token": TOKEN, "count": count, "hoard": hoard.count(b"x"),
                           "path": request.split()[1].decode()}).encode()
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nConnection: close\\r\\n"
                     b"Content-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
        await writer.drain()
        writer.close()


    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 8080)
        print("asyncio app listening", flush=True)
        await server.serve_forever()


    asyncio.run(main())
    """
)
PAGES = (8 << 20) // 4096


def gvisor_only(driver: BaseDriver) -> GVisorDriver:
    if not isinstance(driver, GVisorDriver):
        pytest.skip(f"the {driver.name} driver has no runsc")
    return driver


@pytest.mark.parametrize("platform", ["default", "systrap"])
def test_asyncio_app_snapshots_restores_and_suspends_with_its_memory(
    driver: BaseDriver, app_rootfs: Path, tmp_path: Path, cache_dir: Path, platform: str
) -> None:
    gvisor = gvisor_only(driver)
    if gvisor.runsc.build_date <= 20221219:
        pytest.skip(
            f"the driver runs {gvisor.runsc.describe()}, which cannot checkpoint an epoll instance "
            "watching a listening socket; a newer one: python -m openmicrovm.runtime.runsc_install"
        )
    options: dict[str, object] = {}
    if platform != "default":
        if platform not in gvisor.runsc.platforms:
            pytest.skip(f"{gvisor.runsc.describe()} has no {platform} platform")
        options["runsc_platform"] = platform
        # No warm pool: nothing would close it (the fixture closes its own driver's).
        made = make_driver("gvisor", gvisor.state_root, cache_dir, restore_pool_size=0, **options)
        assert isinstance(made, GVisorDriver) and made.platform == platform
        gvisor = made
    spec = app_spec(app_rootfs, argv=["python3", "-c", ASYNCIO_APP])

    async def scenario() -> None:
        sandbox = await gvisor.start("build-asyncio", spec)
        to_disk = make_driver("gvisor", gvisor.state_root, cache_dir, suspend_to_disk_after=0, **options)
        try:
            _, first = await http(gvisor, sandbox)
            assert first["hoard"] == PAGES
            # Suspend to disk and back: the same checkpoint as a snapshot, restored in place.
            await to_disk.suspend(sandbox)
            assert record_of(sandbox).suspended_in == "disk"
            await to_disk.resume(sandbox)
            _, second = await http(gvisor, sandbox)
            assert (second["token"], second["count"]) == (first["token"], 2)
            info = await gvisor.snapshot(sandbox, tmp_path / "snap")
        except BaseException:
            await gvisor.destroy(sandbox)
            raise
        assert info.memory_bytes > 0
        meta = json.loads((tmp_path / "snap" / SNAPSHOT_FILE).read_text())
        assert (meta["runsc_version"], meta["runsc_platform"]) == (gvisor.runsc.version, gvisor.platform)
        restored = []
        try:
            for name in ("microvm-aio1", "microvm-aio2"):
                restored.append(await gvisor.restore(name, tmp_path / "snap"))
            for box in restored:
                _, body = await http(gvisor, box, "/after-restore")
                assert body == {"token": first["token"], "count": 3, "hoard": PAGES, "path": "/after-restore"}
                assert record_of(box).runsc == gvisor.runsc.path
            _, again = await http(gvisor, restored[0])
            assert again["count"] == 4  # each restore goes on on its own
        finally:
            for box in restored:
                await gvisor.destroy(box)

    run(scenario())


def test_sandboxes_and_snapshots_of_an_older_runsc_keep_working_under_it(
    driver: BaseDriver, app_rootfs: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """After an upgrade, what the runsc on PATH made keeps working: a snapshot (recorded version, or
    none at all from before versions were recorded) is restored by the runsc that wrote it, and a
    sandbox from before the upgrade is adopted, suspended to disk and resumed under its own runsc,
    while new sandboxes use the newest one."""
    gvisor = gvisor_only(driver)
    system = runsc.system_binary()
    old = runsc.probe(system) if system else None
    if old is None or old.version == gvisor.runsc.version:
        pytest.skip("needs two runsc versions: the one on PATH and a newer one in the cache")
    legacy = make_driver("gvisor", gvisor.state_root, cache_dir, runsc=old.path)
    assert isinstance(legacy, GVisorDriver) and legacy.platform == "ptrace"

    async def scenario() -> None:
        sandbox = await legacy.start("build-old-runsc", app_spec(app_rootfs))
        try:
            _, first = await http(legacy, sandbox)
            await legacy.snapshot(sandbox, tmp_path / "snap")
        except BaseException:
            await legacy.destroy(sandbox)
            raise
        meta_file = tmp_path / "snap" / SNAPSHOT_FILE
        meta = json.loads(meta_file.read_text())
        assert meta["runsc_version"] == old.version
        restored = []
        try:
            restored.append(await gvisor.restore("microvm-old1", tmp_path / "snap"))
            # As written before snapshots recorded their runsc.
            del meta["runsc_version"], meta["runsc_platform"]
            meta_file.write_text(json.dumps(meta))
            restored.append(await gvisor.restore("microvm-old2", tmp_path / "snap"))
            for box in restored:
                assert (record_of(box).runsc, record_of(box).runsc_platform) == (old.path, "ptrace")
                _, body = await http(gvisor, box)
                assert (body["token"], body["count"]) == (first["token"], 2)
            fresh = await gvisor.start("microvm-new-runsc", app_spec(app_rootfs))
            restored.append(fresh)
            assert record_of(fresh).runsc == gvisor.runsc.path
            # A sandbox running since before the upgrade: its record names no runsc.
            running = await legacy.start("microvm-pre-upgrade", app_spec(app_rootfs))
            restored.append(running)
            _, before = await http(legacy, running)
            record = json.loads((running.state_dir / "record.json").read_text())
            del record["runsc"], record["runsc_platform"]
            (running.state_dir / "record.json").write_text(json.dumps(record))
            upgraded = make_driver("gvisor", gvisor.state_root, cache_dir, suspend_to_disk_after=0)
            assert isinstance(upgraded, GVisorDriver) and upgraded.runsc == gvisor.runsc
            adopted = await upgraded.adopt("microvm-pre-upgrade")
            assert adopted is not None and upgraded.binary_of(adopted) == (old, "ptrace")
            await upgraded.suspend(adopted)
            assert record_of(adopted).suspended_in == "disk"
            await upgraded.resume(adopted)
            _, after = await http(upgraded, adopted)
            assert (after["token"], after["count"]) == (before["token"], before["count"] + 1)
        finally:
            for box in restored:
                await gvisor.destroy(box)

    run(scenario())


def test_a_snapshot_of_a_runsc_that_is_not_installed_is_refused_clearly(
    driver: BaseDriver, app_rootfs: Path, tmp_path: Path
) -> None:
    gvisor = gvisor_only(driver)
    snapshot = tmp_path / "snap"
    (snapshot / MEMORY_IMAGE).mkdir(parents=True)
    (snapshot / MEMORY_IMAGE / "checkpoint.img").write_bytes(b"not a checkpoint")
    (snapshot / SNAPSHOT_AGENT).write_bytes(b"")
    meta = GVisorSnapshotMeta("gvisor", app_spec(app_rootfs), "0" * 32, 0, 0, "0.0~19990101.0", "systrap")
    (snapshot / SNAPSHOT_FILE).write_text(meta.to_json())
    with pytest.raises(SnapshotError, match=r"made by runsc 0\.0~19990101\.0, which is not installed"):
        run(gvisor.restore("microvm-nope", snapshot))
    assert gvisor.load("microvm-nope") is None


def test_the_runsc_binary_and_platform_can_be_chosen(tmp_path: Path, cache_dir: Path) -> None:
    found = runsc.installed([cache_dir])
    if not found:
        pytest.skip("no runsc here")
    newest = found[0]
    assert runsc.choose(cache_dirs=[cache_dir]) == newest
    assert [r.build_date for r in found] == sorted((r.build_date for r in found), reverse=True)
    oldest = found[-1]
    assert runsc.choose(oldest.path, [cache_dir]) == oldest
    with pytest.raises(runsc.RunscError, match=r"runsc \(\$OPENMICROVM_RUNSC\) names .*missing-runsc"):
        runsc.choose(str(tmp_path / "missing-runsc"))
    # The settings, and so their environment variables (the platform's under both names), reach
    # the driver's own options.
    env = {
        "OPENMICROVM_DATA_DIR": str(tmp_path / "data"),
        "OPENMICROVM_SYSTEM_CONFIG": str(tmp_path / "none.toml"),
        "OPENMICROVM_RUNSC": oldest.path,
        "OPENMICROVM_RUNSC_PLATFORM": "systrap",
    }
    options = GVisorOptions.from_settings(load_settings(environ=env))
    assert (options.runsc, options.runsc_platform) == (oldest.path, "systrap")
    env["OPENMICROVM_GVISOR_PLATFORM"] = "ptrace"  # the setting's own name wins
    assert GVisorOptions.from_settings(load_settings(environ=env)).runsc_platform == "ptrace"
    assert runsc.choose_platform(newest) == "ptrace"
    if "systrap" in newest.platforms:
        assert runsc.choose_platform(newest, "systrap") == "systrap"
    with pytest.raises(runsc.RunscError, match="no 'nonsense' platform"):
        runsc.choose_platform(newest, "nonsense")
    with pytest.raises(DriverError, match="no 'nonsense' platform"):
        make_driver("gvisor", tmp_path / "state", cache_dir, runsc_platform="nonsense")
    chosen = make_driver("gvisor", tmp_path / "state", cache_dir, runsc=oldest.path)
    assert isinstance(chosen, GVisorDriver) and chosen.runsc == oldest
    assert chosen.platform == "ptrace"
    not_runsc = tmp_path / "runsc"
    not_runsc.write_text("#!/bin/sh\nexit 3\n")
    not_runsc.chmod(0o755)
    assert runsc.probe(not_runsc) is None


def test_a_probe_is_kept_across_processes_until_the_binary_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server start probes every runsc (three runs each); what a probe found is kept on disk
    for the next process, and a binary that changed, or did not run, is probed again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "runsc"
    fake.parent.mkdir()

    def write_fake(version: str) -> None:
        fake.write_text(
            textwrap.dedent(f"""\
                #!/bin/sh
                echo "$@" >> {calls}
                case "$1" in
                  --version) echo "runsc version {version}" ;;
                  flags) printf '  -platform string\\n    \\tspecifies which platform to use: ptrace (default), systrap.\\n  -root string\\n' >&2 ;;
                  checkpoint) printf '  -image-path string\\n' >&2 ;;
                esac
            """)
        )
        fake.chmod(0o755)

    def probed_afresh() -> runsc.Runsc | None:
        runsc._probed.clear()  # as in a new process
        return runsc.probe(fake)

    def runs() -> int:
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    write_fake("0.0~20240101.0")
    first = probed_afresh()
    assert first is not None and first.version == "0.0~20240101.0" and runs() == 3
    assert first.platforms == ("ptrace", "systrap") and first.has_flag("root")
    assert first.checkpoint_flags == frozenset({"image-path"})
    assert probed_afresh() == first and runs() == 3
    write_fake("0.0~20250202.0")  # another size: another binary
    second = probed_afresh()
    assert second is not None and second.version == "0.0~20250202.0" and runs() == 6
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 3\n')
    assert probed_afresh() is None and probed_afresh() is None
    assert runs() == 8  # `--version` each time: a binary that does not run is not kept
