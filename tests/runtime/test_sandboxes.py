"""Sandbox lifecycle against every available driver: start, reach, limit, isolate, snapshot, suspend."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from openmicrovm.runtime import DriverError, SandboxDriver, cgroups, make_driver
from openmicrovm.runtime.base import BaseDriver
from openmicrovm.runtime.records import record_of
from tests.runtime.conftest import run
from tests.runtime.helpers import app_spec, http, probe, run_command, warm_pool_key

# Spec §5.8: chown, dac_override, fowner, fsetid, kill, setgid, setuid, setpcap, net_bind_service,
# net_raw, sys_chroot, mknod, audit_write, setfcap (capability numbers from linux/capability.h).
REDUCED_CAPS = {0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31}
CAP_SYS_ADMIN = 21


def test_app_is_reachable_on_loopback_and_runs_as_the_image_user(
    driver: SandboxDriver, app_rootfs: Path
) -> None:
    async def scenario() -> None:
        sandbox = await driver.start("microvm-reach", app_spec(app_rootfs, user="nobody"))
        try:
            status, body = await http(driver, sandbox)
            assert status == 200
            assert body["count"] == 1
            assert body["hostname"] == "microvm"
            assert body["uid"] == 65534
            stats = await driver.stats(sandbox)
            assert stats.rss_bytes > 0 and stats.cpu_seconds > 0
            app = await driver.app_status(sandbox)
            assert app.state == "running" and not app.oom_killed
            assert driver.log_path(sandbox).read_text().count("app listening on 127.0.0.1:8080") == 1
        finally:
            await driver.destroy(sandbox)
        # destroy() twice is allowed
        await driver.destroy(sandbox)

    run(scenario())


def test_the_shim_that_parents_a_sandbox_lives_in_its_cgroups_not_the_servers(
    driver: BaseDriver, app_rootfs: Path
) -> None:
    """The omv-shim keeper reaps the sandbox's processes. Left in the cgroup of the server that
    started it (a systemd unit's), it would outlive a stop of the server there, and a
    `systemctl kill` of the server would end it."""

    def shims_in(pids: list[int]) -> list[int]:
        found = []
        for pid in pids:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "omv-shim":
                    found.append(pid)
            except OSError:
                continue
        return found

    async def scenario() -> None:
        sandbox = await driver.start("microvm-shim", app_spec(app_rootfs))
        try:
            assert (await http(driver, sandbox))[0] == 200
            cgroup = driver.cgroup_of(sandbox)
            keepers = shims_in(cgroup.pids())
            assert keepers, f"no omv-shim among the processes of {cgroup.relative}"
            ours = Path("/proc/self/cgroup").read_text()
            for pid in keepers:
                assert Path(f"/proc/{pid}/cgroup").read_text() != ours
        finally:
            await driver.destroy(sandbox)

    run(scenario())


def test_destroy_leaves_the_keeper_to_reap_the_sandbox_and_go_by_itself(
    driver: BaseDriver, app_rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed together with the sandbox's processes, the keeper would leave them zombies for the
    host's init, which reaps only now and then on some hosts (here: about a second per sandbox,
    which `runsc delete` waited out, and a cleanup of 200 sandboxes took minutes). So destroy
    kills every other process first, and the keeper, having reaped them, exits on its own."""
    signalled: list[int] = []
    real_kill = cgroups.os.kill

    def recording_kill(pid: int, signum: int) -> None:
        signalled.append(pid)
        real_kill(pid, signum)

    async def scenario() -> None:
        sandbox = await driver.start("microvm-reaped", app_spec(app_rootfs))
        cgroup = driver.cgroup_of(sandbox)
        keepers = [
            pid for pid in cgroup.pids() if Path(f"/proc/{pid}/comm").read_text().strip() == "omv-shim"
        ]
        others = set(cgroup.pids()) - set(keepers)
        assert keepers and others
        monkeypatch.setattr(cgroups.os, "kill", recording_kill)
        await driver.destroy(sandbox)
        assert not cgroup.exists()
        assert others & set(signalled), "destroy signalled none of the sandbox's processes"
        assert not set(keepers) & set(signalled), "the keeper was killed instead of exiting by itself"

    run(scenario())


def test_pty_runs_commands_with_the_sandbox_hostname_and_follows_resizes(
    driver: SandboxDriver, app_rootfs: Path
) -> None:
    async def scenario() -> None:
        sandbox = await driver.start("microvm-pty", app_spec(app_rootfs))
        try:
            status, output = await run_command(driver, sandbox, ["id"])
            assert status == 0
            assert "uid=0(root)" in output

            session = await driver.exec_pty(sandbox, ["/bin/sh"], rows=24, cols=80)
            seen = bytearray()
            try:
                await session.write(b"stty size; echo MARK1\n")
                while b"MARK1\r\n" not in seen.replace(b"echo MARK1", b""):
                    seen += await asyncio.wait_for(session.read(), 30)
                assert b"24 80" in seen
                await session.resize(40, 120)
                await session.write(b"stty size; hostname; exit 7\n")
                while chunk := await asyncio.wait_for(session.read(), 30):
                    seen += chunk
                assert await session.wait() == 7
            finally:
                await session.close()
            text = seen.decode(errors="replace")
            assert "40 120" in text
            assert "microvm" in text.split("exit 7", 1)[1]
        finally:
            await driver.destroy(sandbox)

    run(scenario())


@pytest.mark.parametrize("all_capabilities", [False, True])
def test_capabilities_follow_the_spec(
    driver: SandboxDriver, app_rootfs: Path, all_capabilities: bool
) -> None:
    async def scenario() -> None:
        spec = app_spec(app_rootfs, all_capabilities=all_capabilities)
        if all_capabilities and driver.name == "process":
            # Every capability on the host's kernel is host root: the process driver refuses it.
            with pytest.raises(
                DriverError, match=r"cannot contain an app with every capability.*gvisor driver"
            ):
                await driver.start(f"microvm-caps-{all_capabilities}", spec)
            return
        sandbox = await driver.start(f"microvm-caps-{all_capabilities}", spec)
        try:
            status, output = await run_command(
                driver, sandbox, ["grep", "-E", "^(CapEff|CapBnd|NoNewPrivs)", "/proc/self/status"]
            )
            assert status == 0, output
        finally:
            await driver.destroy(sandbox)
        fields = dict(line.split(":\t") for line in output.strip().splitlines())
        effective = {bit for bit in range(64) if int(fields["CapEff"], 16) >> bit & 1}
        bounding = {bit for bit in range(64) if int(fields["CapBnd"], 16) >> bit & 1}
        if all_capabilities:
            assert CAP_SYS_ADMIN in effective and REDUCED_CAPS < effective
        else:
            assert effective == REDUCED_CAPS
            assert bounding == REDUCED_CAPS
            # gVisor's /proc/self/status has no NoNewPrivs line; where it is shown it must be set.
            assert fields.get("NoNewPrivs", "1").strip() == "1"

    run(scenario())


def test_memory_limit_kills_an_over_allocating_process(driver: SandboxDriver, app_rootfs: Path) -> None:
    """The host is protected either way. The process driver's kernel kills just the offender; under
    gVisor all of a sandbox's memory belongs to one host process (the sentry), so the host kernel
    kills the whole sandbox, and the driver says so."""

    async def scenario() -> None:
        sandbox = await driver.start("microvm-oom", app_spec(app_rootfs, memory_mib=512))
        try:
            await http(driver, sandbox)
            hog = ["python3", "-c", "b = bytearray(1536 * 1024 * 1024); print('allocated', len(b))"]
            command = asyncio.create_task(run_command(driver, sandbox, hog))
            # Wait for the command to end, or for the whole sandbox to stop (gVisor).
            while not command.done() and (await driver.app_status(sandbox)).state == "running":
                await asyncio.wait([command], timeout=0.2)
            if command.done() and command.exception() is None:
                status, output = command.result()
            else:
                command.cancel()
                status, output = None, ""
            assert "allocated" not in output
            app = await driver.app_status(sandbox)
            assert app.oom_killed, app
            if driver.name == "process":
                assert status == 128 + 9, output  # SIGKILL from the OOM killer
                assert app.state == "running"
                status, _ = await http(driver, sandbox)
                assert status == 200
            else:
                assert app.state == "stopped", app
                assert "memory limit of 512 MiB" in app.detail
        finally:
            await driver.destroy(sandbox)

    run(scenario())


class HostListener:
    """A TCP listener on the host that counts connections."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((address, 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def host_listeners() -> Iterator[tuple[HostListener, HostListener]]:
    loopback, everywhere = HostListener("127.0.0.1"), HostListener("0.0.0.0")
    yield loopback, everywhere
    loopback.close()
    everywhere.close()


def host_addresses() -> list[str]:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    return sorted({line.split()[3].split("/")[0] for line in out.splitlines()} - {"127.0.0.1"})


def test_sandbox_reaches_neither_host_services_nor_other_sandboxes(
    driver: SandboxDriver, app_rootfs: Path, host_listeners: tuple[HostListener, HostListener]
) -> None:
    loopback, everywhere = host_listeners

    async def scenario() -> None:
        # The other sandbox listens on every interface it has, on a port nobody else uses.
        other = await driver.start(
            "microvm-other", app_spec(app_rootfs, env={"APP_HOST": "0.0.0.0", "APP_PORT": "9090"})
        )
        sandbox = await driver.start("microvm-probe", app_spec(app_rootfs))
        try:
            status, _ = await http(driver, other, port=9090)
            assert status == 200  # it does listen
            status, _ = await http(driver, sandbox)
            assert status == 200
            targets = [f"127.0.0.1:{loopback.port}", "127.0.0.1:9090", f"169.254.77.1:{everywhere.port}"]
            targets += ["169.254.77.1:9090", "169.254.77.2:9090"]
            targets += [f"{address}:{everywhere.port}" for address in host_addresses()]
            targets += [f"{address}:9090" for address in host_addresses()]
            results = await probe(driver, sandbox, targets)
            assert results.keys() == set(targets)
            assert all(result != "connected" for result in results.values()), results
            # ... while its own loopback works, so the probe itself is sound.
            own = await probe(driver, sandbox, ["127.0.0.1:8080"])
            assert own == {"127.0.0.1:8080": "connected"}
        finally:
            await driver.destroy(sandbox)
            await driver.destroy(other)
        assert loopback.accepted == 0 and everywhere.accepted == 0

    run(scenario())


def test_snapshot_then_two_restores(driver: SandboxDriver, app_rootfs: Path, tmp_path: Path) -> None:
    """gvisor: both restores continue from the snapshot's memory, then diverge. process: the
    capability says there is no memory snapshot, and a restore cold-starts the app (its counter
    starts over) on the snapshot's files."""

    async def scenario() -> None:
        sandbox = await driver.start("build-snap", app_spec(app_rootfs))
        try:
            _, first = await http(driver, sandbox)
            _, second = await http(driver, sandbox)
            assert second["count"] == 2
            await http(driver, sandbox, "/write?path=/srv/note.txt&text=before-snapshot")
            info = await driver.snapshot(sandbox, tmp_path / "snap")
        except BaseException:
            await driver.destroy(sandbox)
            raise
        assert info.path == tmp_path / "snap"
        assert info.code_bytes > 50 * 1024 * 1024
        assert not (app_rootfs / "srv" / "note.txt").exists()  # the image was not written to
        restored = []
        try:
            for name in ("microvm-r1", "microvm-r2"):
                restored.append(await driver.restore(name, tmp_path / "snap"))
            r1, r2 = restored
            _, a1 = await http(driver, r1)
            _, b1 = await http(driver, r2)
            _, a2 = await http(driver, r1)
            for number, box in enumerate((r1, r2)):
                _, note = await http(driver, box, "/read?path=/srv/note.txt")
                assert note == {"text": "before-snapshot"}
                # What the app prints after a restore lands in the restored sandbox's own log.
                await http(driver, box, f"/print?text=hello-from-restore-{number}")
                assert f"hello-from-restore-{number}" in driver.log_path(box).read_text()
            if driver.capabilities.memory_snapshot:
                assert info.memory_bytes > 0
                assert a1["token"] == b1["token"] == first["token"]
                assert (a1["count"], b1["count"], a2["count"]) == (3, 3, 4)
            else:
                assert info.memory_bytes == 0
                assert a1["token"] != first["token"] and b1["token"] != a1["token"]
                assert (a1["count"], b1["count"], a2["count"]) == (1, 1, 2)
        finally:
            for box in restored:
                await driver.destroy(box)

    run(scenario())


@pytest.mark.parametrize("tier", ["memory", "disk", "disk-later"])
def test_suspend_and_resume_keep_memory(
    driver: BaseDriver, app_rootfs: Path, cache_dir: Path, tier: str
) -> None:
    """memory: frozen in RAM, resume is a thaw. disk (drivers that can): the memory goes to disk at
    once (suspend_to_disk_after=0) or after a while, and the RAM is freed until resume."""
    if tier != "memory" and not driver.capabilities.suspend_releases_memory:
        pytest.skip(f"the {driver.name} driver keeps a suspended sandbox in memory")
    delay = {"memory": 3600.0, "disk": 0.0, "disk-later": 0.5}[tier]
    tiered = make_driver(driver.name, driver.state_root, cache_dir, suspend_to_disk_after=delay)

    async def scenario() -> None:
        sandbox = await tiered.start("microvm-suspend", app_spec(app_rootfs))
        try:
            _, before = await http(tiered, sandbox)
            running_rss = (await tiered.stats(sandbox)).rss_bytes
            await tiered.suspend(sandbox)
            assert tiered.is_suspended(sandbox)
            assert (await tiered.app_status(sandbox)).state == "suspended"
            with pytest.raises(DriverError, match="suspended"):
                await tiered.connect(sandbox, 8080)
            if tier == "disk-later":
                for _ in range(600):  # the disk tier runs in the background
                    record = tiered.refresh(sandbox)
                    # Suspended all along, also while the memory is being written to disk.
                    assert tiered.is_suspended(sandbox), record
                    if (record.state, record.suspended_in) == ("suspended", "disk"):
                        break
                    await asyncio.sleep(0.05)
            assert record_of(sandbox).suspended_in == ("memory" if tier == "memory" else "disk")
            suspended_rss = (await tiered.stats(sandbox)).rss_bytes
            if tier == "memory":
                assert suspended_rss > running_rss / 2
            else:
                assert suspended_rss < running_rss / 4
            await tiered.resume(sandbox)
            assert not tiered.is_suspended(sandbox)
            _, after = await http(tiered, sandbox)
            assert after["token"] == before["token"]
            assert after["count"] == before["count"] + 1
        finally:
            await tiered.destroy(sandbox)

    run(scenario())


def test_hot_snapshots_restore_from_a_warm_pool(
    driver: BaseDriver, app_rootfs: Path, tmp_path: Path, cache_dir: Path
) -> None:
    if not driver.capabilities.memory_snapshot:
        pytest.skip(f"the {driver.name} driver restores by cold start; there is nothing to keep warm")

    async def scenario() -> None:
        sandbox = await driver.start("build-pool", app_spec(app_rootfs))
        try:
            await http(driver, sandbox)
            await driver.snapshot(sandbox, tmp_path / "snap")
        except BaseException:
            await driver.destroy(sandbox)
            raise
        restored = []
        try:
            for name in ("microvm-p1", "microvm-p2"):  # the second restore makes the snapshot hot
                restored.append(await driver.restore(name, tmp_path / "snap"))
            warm_key = await warm_pool_key(driver)  # the pool fills in the background
            third = await driver.restore("microvm-p3", tmp_path / "snap")
            restored.append(third)
            assert record_of(third).key == warm_key  # handed out from the pool ...
            _, body = await http(driver, third)
            assert body["count"] == 2  # ... continuing from the snapshot like any restore
            assert driver.load("microvm-p3") is not None and not driver.is_suspended(third)
            # A handed-out sandbox is a sandbox like any other: it can go to disk and come back.
            to_disk = make_driver(driver.name, driver.state_root, cache_dir, suspend_to_disk_after=0)
            await to_disk.suspend(third)
            assert record_of(third).suspended_in == "disk"
            await to_disk.resume(third)
            _, body = await http(driver, third)
            assert body["count"] == 3
        finally:
            for box in restored:
                await driver.destroy(box)

    run(scenario())


def test_a_restarted_server_adopts_its_sandboxes(
    driver: BaseDriver, app_rootfs: Path, cache_dir: Path
) -> None:
    async def scenario() -> None:
        running = await driver.start("microvm-adopt-run", app_spec(app_rootfs))
        suspended = await driver.start("microvm-adopt-sus", app_spec(app_rootfs))
        try:
            _, before = await http(driver, running)
            await driver.suspend(suspended)
            # A new driver object on the same state root, as after a server restart.
            again = make_driver(driver.name, driver.state_root, cache_dir)
            adopted = await again.adopt("microvm-adopt-run")
            assert adopted is not None and not again.is_suspended(adopted)
            _, after = await http(again, adopted)
            assert (after["token"], after["count"]) == (before["token"], before["count"] + 1)
            adopted_suspended = await again.adopt("microvm-adopt-sus")
            assert adopted_suspended is not None and again.is_suspended(adopted_suspended)
            assert await again.adopt("microvm-never-existed") is None
            assert await again.cleanup_strays({"microvm-adopt-run"}) == ["microvm-adopt-sus"]
            assert await again.adopt("microvm-adopt-sus") is None
            _, still = await http(again, adopted)
            assert still["count"] == before["count"] + 2
        finally:
            await driver.destroy(running)
            await driver.destroy(suspended)

    run(scenario())


def test_agent_requires_the_token_and_copes_with_partial_reads(driver: BaseDriver, app_rootfs: Path) -> None:
    """The agent listens inside the sandbox, where the app could reach it too: without the secret
    a request gets nothing."""
    from openmicrovm.runtime import agent_client

    async def scenario() -> None:
        sandbox = await driver.start("microvm-agent", app_spec(app_rootfs))
        try:
            address = driver.agent_address(sandbox)
            forged = agent_client.AgentAddress(address.open_socket, "0" * 32)
            with pytest.raises(agent_client.AgentError, match="bad token"):
                await agent_client.control(forged, "STATUS")
            # A request line that arrives one byte at a time is still understood.
            sock = await address.open_socket()
            reader, writer = await asyncio.open_connection(sock=sock)
            for byte in agent_client.request_line(address.token, "STATUS"):
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.001)
            reply = agent_client.parse_reply(await asyncio.wait_for(reader.readline(), 30))
            writer.close()
            assert reply["app"] == "running"
            with pytest.raises(agent_client.AgentError, match="malformed"):
                await agent_client.control(address, "CONNECT")
            with pytest.raises(agent_client.AgentError, match="unknown verb"):
                await agent_client.control(address, "REBOOT")
        finally:
            await driver.destroy(sandbox)

    run(scenario())
