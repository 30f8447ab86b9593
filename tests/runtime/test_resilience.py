"""What an unlucky or hostile world does to sandboxes: a flood of connections, an app or a whole
sandbox that dies, a server killed in the middle of a suspend, a resume or a start, and what a
crash leaves in the cgroup hierarchies. Each test runs against every driver that applies."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from pathlib import Path
from typing import Any

import pytest

from openmicrovm.runtime import (
    SandboxDriver,
    TooManyConnections,
    agent_client,
    cgroups,
    make_driver,
    names,
    netns,
)
from openmicrovm.runtime.base import BaseDriver
from openmicrovm.runtime.driver import Sandbox
from openmicrovm.runtime.gvisor import GVisorDriver
from openmicrovm.runtime.gvisor.checkpoint import Marker, checkpoint
from openmicrovm.runtime.gvisor.suspend import CHECKPOINT_DONE, SUSPEND_IMAGE
from openmicrovm.runtime.records import record_of
from tests.runtime.conftest import run
from tests.runtime.helpers import APP_PORT, WAIT_SECONDS, app_spec, http

FLOOD = 200


def gvisor_only(driver: BaseDriver) -> GVisorDriver:
    if not isinstance(driver, GVisorDriver):
        pytest.skip(f"the {driver.name} driver has no guest agent relay, suspend image or runsc")
    return driver


def pids_limit_hits(driver: BaseDriver, sandbox: Sandbox) -> int:
    """How often the sandbox's pids cgroup refused a new task."""
    events = driver.layout.controller_dir("pids", driver.cgroup_of(sandbox).relative) / "pids.events"
    words = events.read_text().split()
    return int(words[words.index("max") + 1]) if "max" in words else 0


async def slow_request(driver: SandboxDriver, sandbox: Sandbox, seconds: float) -> str:
    """One request that takes the app `seconds`: its status, or "too many" when refused."""
    try:
        reader, writer = await driver.connect(sandbox, APP_PORT)
    except TooManyConnections:
        return "too many"
    try:
        writer.write(f"GET /slow?seconds={seconds} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), WAIT_SECONDS * 2)
    finally:
        writer.close()
    return data.split(b" ", 2)[1].decode() if data else "no answer"


async def wait_until(condition: Any, what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------ a flood


def test_a_connection_flood_leaves_the_sandbox_alive(driver: BaseDriver, app_rootfs: Path) -> None:
    """200 slow requests at once. The gvisor agent relays up to MAX_RELAYED_CONNECTIONS from one
    process and refuses the rest (TooManyConnections), so the sandbox's pids cgroup never fills
    and the app answers afterwards; the process driver connects straight to the app."""

    async def scenario() -> None:
        sandbox = await driver.start("microvm-flood", app_spec(app_rootfs))
        try:
            await http(driver, sandbox)
            outcomes = collections.Counter(
                await asyncio.gather(*(slow_request(driver, sandbox, 3) for _ in range(FLOOD)))
            )
            print(f"flood outcomes: {dict(outcomes)}")
            assert set(outcomes) <= {"200", "too many"}, outcomes
            assert outcomes["200"] >= min(FLOOD, agent_client.MAX_RELAYED_CONNECTIONS) // 2, outcomes
            if driver.name == "process":
                assert outcomes["200"] == FLOOD
            assert pids_limit_hits(driver, sandbox) == 0
            assert (await driver.app_status(sandbox)).state == "running"
            status, body = await http(driver, sandbox)
            assert status == 200 and body["count"] == 2
        finally:
            await driver.destroy(sandbox)

    run(scenario())


def test_the_agent_relays_a_bounded_number_of_connections(driver: BaseDriver, app_rootfs: Path) -> None:
    """One connection more than the agent relays is refused at once with TooManyConnections; once
    one closes there is room again, and control requests are never refused for it."""
    gvisor = gvisor_only(driver)
    limit = agent_client.MAX_RELAYED_CONNECTIONS

    async def room_again(sandbox: Sandbox) -> asyncio.StreamWriter:
        """A new relay, once closed ones have made room: a relay ends when the app has closed its
        side too, a moment after the client has."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_SECONDS
        while True:
            try:
                return (await gvisor.connect(sandbox, APP_PORT))[1]
            except TooManyConnections:
                assert loop.time() < deadline, "a closed relay never made room"
                await asyncio.sleep(0.05)

    async def scenario() -> None:
        sandbox = await gvisor.start("microvm-limit", app_spec(app_rootfs))
        held: list[asyncio.StreamWriter] = []
        try:
            await http(gvisor, sandbox)
            for _ in range(limit):
                held.append((await gvisor.connect(sandbox, APP_PORT))[1])
            with pytest.raises(TooManyConnections, match="as many connections as it takes"):
                await gvisor.connect(sandbox, APP_PORT)
            assert (await gvisor.app_status(sandbox)).state == "running"  # STATUS is not a relay
            held.pop().close()
            held.append(await room_again(sandbox))
            for writer in held:
                writer.close()
            held.clear()
            (await room_again(sandbox)).close()  # the closed relays have ended, not only one
            status, _ = await http(gvisor, sandbox)
            assert status == 200
        finally:
            for writer in held:
                writer.close()
            await gvisor.destroy(sandbox)

    run(scenario())


def test_a_terminal_whose_client_leaves_is_hung_up(driver: BaseDriver, app_rootfs: Path) -> None:
    """The agent serves terminals from its one process too: a session whose client goes away
    while its command runs gets the command hung up, not left behind."""
    gvisor_only(driver)

    async def count_sleepers(sandbox: Sandbox) -> int:
        session = await driver.exec_pty(
            sandbox,
            [
                "python3",
                "-c",
                "import os\n"
                "found = [p for p in os.listdir('/proc') if p.isdigit() and "
                "open(f'/proc/{p}/cmdline').read().startswith('sleep')]\n"
                "print('SLEEPERS', len(found))",
            ],
        )
        output = bytearray()
        while chunk := await asyncio.wait_for(session.read(), WAIT_SECONDS):
            output += chunk
        await session.close()
        return int(output.decode().split("SLEEPERS")[1].split()[0])

    async def scenario() -> None:
        sandbox = await driver.start("microvm-hangup", app_spec(app_rootfs))
        try:
            session = await driver.exec_pty(sandbox, ["sleep", "300"])
            assert await count_sleepers(sandbox) == 1
            await session.close()
            deadline = time.monotonic() + WAIT_SECONDS
            while await count_sleepers(sandbox):
                assert time.monotonic() < deadline, "the hung-up command is still there"
                await asyncio.sleep(0.1)
        finally:
            await driver.destroy(sandbox)

    run(scenario())


# ------------------------------------------------------------------------------ wait_exit


def test_wait_exit_reports_an_exited_app_and_a_dead_sandbox_but_not_a_suspended_one(
    driver: BaseDriver, app_rootfs: Path, cache_dir: Path
) -> None:
    # Suspended to disk at once where the driver can: the sandbox's cgroup is empty meanwhile.
    suspender = make_driver(driver.name, driver.state_root, cache_dir, suspend_to_disk_after=0)

    async def scenario() -> None:
        exiting = await driver.start("microvm-exits", app_spec(app_rootfs))
        dying = await driver.start("microvm-dies", app_spec(app_rootfs))
        try:
            await http(driver, exiting)
            await http(driver, dying)
            watch_exiting = asyncio.create_task(driver.wait_exit(exiting, interval=0.1))
            watch_dying = asyncio.create_task(driver.wait_exit(dying, interval=0.1))
            await suspender.suspend(dying)
            await asyncio.sleep(1.0)
            assert not watch_dying.done(), watch_dying.result()
            await suspender.resume(dying)
            await asyncio.sleep(0.5)
            assert not watch_dying.done(), watch_dying.result()
            assert not watch_exiting.done(), watch_exiting.result()

            started = time.monotonic()
            await http(driver, exiting, "/exit?code=3")
            status = await asyncio.wait_for(watch_exiting, WAIT_SECONDS)
            assert (status.state, status.exit_status) == ("exited", 3), status
            assert "status 3" in status.detail
            assert time.monotonic() - started < 5  # the agent answers at once (WAIT)

            await driver.cgroup_of(dying).kill_all()  # as when killed at its memory limit
            status = await asyncio.wait_for(watch_dying, WAIT_SECONDS)
            assert status.state == "stopped" and "not running" in status.detail, status

            watch_destroyed = asyncio.create_task(driver.wait_exit(exiting, interval=0.1))
            await driver.destroy(exiting)
            status = await asyncio.wait_for(watch_destroyed, WAIT_SECONDS)
            assert (status.state, status.detail) == ("stopped", "the sandbox was destroyed")
        finally:
            await driver.destroy(exiting)
            await driver.destroy(dying)

    run(scenario())


# ------------------------------------------------------------------------------ crashes


def restarted(driver: BaseDriver, cache_dir: Path) -> BaseDriver:
    """A new driver on the same state root: the server after a restart."""
    again = make_driver(driver.name, driver.state_root, cache_dir)
    assert isinstance(again, BaseDriver)
    return again


def test_a_suspend_to_disk_finished_after_a_crash_is_adopted_as_suspended(
    driver: BaseDriver, app_rootfs: Path, cache_dir: Path
) -> None:
    """The server died during a suspend to disk; the checkpoint, a command of its own, carries on
    and completes. adopt() waits for it and finds the sandbox suspended, memory intact."""
    gvisor = gvisor_only(driver)

    async def scenario() -> None:
        sandbox = await gvisor.start("microvm-crash-suspend", app_spec(app_rootfs))
        checkpointing: asyncio.Task[Any] | None = None
        again = restarted(gvisor, cache_dir)
        try:
            _, before = await http(gvisor, sandbox)
            # suspend() up to the checkpoint, whose end the "killed" server never sees.
            gvisor.tiers.mark(sandbox, "suspending", "disk")
            image = sandbox.state_dir / SUSPEND_IMAGE
            image.mkdir()
            marker = sandbox.state_dir / CHECKPOINT_DONE
            checkpoint_run = checkpoint(
                gvisor.commands,
                gvisor.binary_of(sandbox),
                gvisor.names_of(sandbox).container,
                gvisor.agent_address(sandbox),
                image,
                done=Marker(marker),
            )
            checkpointing = asyncio.create_task(checkpoint_run)
            pid_file = marker.with_name(marker.name + ".pid")
            await wait_until(pid_file.exists, "the checkpoint to start")
            adopted = await again.adopt(sandbox.sandbox_id)  # while the checkpoint runs
            assert (await checkpointing).returncode == 0
            assert adopted is not None and again.is_suspended(adopted)
            assert record_of(adopted).suspended_in == "disk"
            assert json.loads((sandbox.state_dir / "record.json").read_text())["state"] == "suspended"
            assert gvisor.names_of(sandbox).container not in again.commands.containers()
            assert not again.cgroup_of(adopted).pids()
            await again.resume(adopted)
            _, after = await http(again, adopted)
            assert (after["token"], after["count"]) == (before["token"], before["count"] + 1)
            assert not image.exists()
        finally:
            if checkpointing is not None:
                await asyncio.gather(checkpointing, return_exceptions=True)
            await again.close()
            await gvisor.destroy(sandbox)

    run(scenario())


def test_an_incomplete_suspend_is_dropped_and_the_sandbox_keeps_running(
    driver: BaseDriver, app_rootfs: Path, cache_dir: Path
) -> None:
    """A checkpoint cut short (no completion marker, half an image): the image goes, the sandbox
    is adopted as running, and suspends to disk later like any other."""
    gvisor = gvisor_only(driver)

    async def scenario() -> None:
        sandbox = await gvisor.start("microvm-half-suspend", app_spec(app_rootfs))
        again = restarted(gvisor, cache_dir)
        try:
            _, before = await http(gvisor, sandbox)
            gvisor.tiers.mark(sandbox, "suspending", "disk")
            image = sandbox.state_dir / SUSPEND_IMAGE
            image.mkdir()
            (image / "checkpoint.img").write_bytes(b"the first bytes of a checkpoint")
            adopted = await again.adopt(sandbox.sandbox_id)
            assert adopted is not None and not again.is_suspended(adopted)
            assert record_of(adopted).state == "running" and not image.exists()
            _, after = await http(again, adopted)
            assert (after["token"], after["count"]) == (before["token"], before["count"] + 1)
            to_disk = make_driver("gvisor", gvisor.state_root, cache_dir, suspend_to_disk_after=0)
            await to_disk.suspend(adopted)
            assert (record_of(adopted).state, record_of(adopted).suspended_in) == ("suspended", "disk")
            await to_disk.resume(adopted)
            _, last = await http(to_disk, adopted)
            assert last["count"] == before["count"] + 2
        finally:
            await again.close()
            await gvisor.destroy(sandbox)

    run(scenario())


def test_a_freeze_the_record_did_not_see_is_adopted_as_suspended(
    driver: BaseDriver, app_rootfs: Path, cache_dir: Path
) -> None:
    """The server died between the freeze of a suspend and writing it down: the freezer says the
    sandbox is suspended in memory, and adopt() believes it."""

    async def scenario() -> None:
        sandbox = await driver.start("microvm-crash-freeze", app_spec(app_rootfs))
        again = restarted(driver, cache_dir)
        try:
            _, before = await http(driver, sandbox)
            record = record_of(sandbox)
            record.state, record.suspended_in = "suspending", "memory"
            driver.save(sandbox)
            await driver.cgroup_of(sandbox).freeze()
            adopted = await again.adopt(sandbox.sandbox_id)
            assert adopted is not None and again.is_suspended(adopted)
            assert record_of(adopted).suspended_in == "memory"
            await again.resume(adopted)
            _, after = await http(again, adopted)
            assert (after["token"], after["count"]) == (before["token"], before["count"] + 1)
        finally:
            await again.close()
            await driver.destroy(sandbox)

    run(scenario())


def test_a_resume_from_disk_is_finished_or_undone_after_a_crash(
    driver: BaseDriver, app_rootfs: Path, cache_dir: Path
) -> None:
    """The record says "resuming": a restore that finished is adopted as running (its image
    goes), one that never ran leaves the sandbox suspended on disk, ready to resume."""
    gvisor = gvisor_only(driver)
    to_disk = make_driver("gvisor", gvisor.state_root, cache_dir, suspend_to_disk_after=0)
    assert isinstance(to_disk, GVisorDriver)

    async def scenario() -> None:
        finished = await to_disk.start("microvm-resumed", app_spec(app_rootfs))
        undone = await to_disk.start("microvm-not-resumed", app_spec(app_rootfs))
        again = restarted(gvisor, cache_dir)
        try:
            _, finished_before = await http(to_disk, finished)
            _, undone_before = await http(to_disk, undone)
            await to_disk.suspend(finished)
            await to_disk.suspend(undone)
            # resume() up to the end of the restore; the server dies before writing "running".
            to_disk.tiers.mark(finished, "resuming", "disk")
            await to_disk.tiers.resume_from_disk(finished)
            to_disk.tiers.mark(undone, "resuming", "disk")  # and dies before the restore even began
            adopted = await again.adopt(finished.sandbox_id)
            assert adopted is not None and not again.is_suspended(adopted)
            assert not (finished.state_dir / SUSPEND_IMAGE).exists()
            _, after = await http(again, adopted)
            assert (after["token"], after["count"]) == (
                finished_before["token"],
                finished_before["count"] + 1,
            )
            waiting = await again.adopt(undone.sandbox_id)
            assert waiting is not None and again.is_suspended(waiting)
            assert record_of(waiting).suspended_in == "disk"
            await again.resume(waiting)
            _, after = await http(again, waiting)
            assert (after["token"], after["count"]) == (undone_before["token"], undone_before["count"] + 1)
        finally:
            await again.close()
            await to_disk.destroy(finished)
            await to_disk.destroy(undone)

    run(scenario())


def test_a_sandbox_whose_start_never_finished_is_removed_by_adopt(
    driver: BaseDriver, app_rootfs: Path, cache_dir: Path
) -> None:
    async def scenario() -> None:
        sandbox = await driver.start("microvm-half-started", app_spec(app_rootfs))
        again = restarted(driver, cache_dir)
        try:
            record = record_of(sandbox)
            record.state = "starting"  # as a start the server did not live to finish leaves it
            driver.save(sandbox)
            assert await again.adopt(sandbox.sandbox_id) is None
            assert not sandbox.state_dir.exists()
            # The id can be used again at once.
            fresh = await again.start(sandbox.sandbox_id, app_spec(app_rootfs))
            assert (await http(again, fresh))[0] == 200
            await again.destroy(fresh)
        finally:
            await again.close()
            await driver.destroy(sandbox)

    run(scenario())


@pytest.mark.skipif(Path("/sys/fs/cgroup/cgroup.controllers").exists(), reason="cgroup v2: one hierarchy")
def test_cleanup_strays_removes_cgroups_from_every_hierarchy(driver: BaseDriver, app_rootfs: Path) -> None:
    """A crash leaves a sandbox's cgroup in hierarchies the driver does not manage (runsc makes it
    in blkio, cpuset, devices, name=systemd, ...), with directories below it: all of it goes,
    while a kept sandbox keeps everything of its own."""
    parent = names.cgroup_parent(driver.scope)
    stray = names.new_key()
    hierarchies = cgroups.all_hierarchies()
    assert len(hierarchies) > len(set(driver.layout.mounts.values()))

    async def scenario() -> None:
        kept = await driver.start("microvm-kept", app_spec(app_rootfs))
        try:
            relative = driver.cgroup_of(kept).relative
            own = {mount for mount in hierarchies if (mount / relative).is_dir()}
            for mount in hierarchies:
                (mount / parent / stray / "below").mkdir(parents=True)
            assert await driver.cleanup_strays({kept.sandbox_id}) == []
            left = [str(mount / parent / stray) for mount in hierarchies if (mount / parent / stray).exists()]
            assert left == []
            still = {mount for mount in hierarchies if (mount / relative).is_dir()}
            assert still == own
            assert (await http(driver, kept))[0] == 200
        finally:
            await driver.destroy(kept)
        for mount in hierarchies:  # the sweep of the driver fixture checks the parents went too
            (mount / parent / stray / "below").mkdir(parents=True)
        await driver.cleanup_strays(set())
        assert [m for m in hierarchies if (m / parent).exists()] == []

    run(scenario())


def test_strays_found_before_a_sandbox_was_made_never_include_it(
    driver: BaseDriver, app_rootfs: Path
) -> None:
    """A restart removes what a crash left while the server already serves (lifecycle/recovery.py):
    the strays are noted first, and removing them must not touch a sandbox made since, whose
    state dir, namespaces, cgroups and runsc container look like a stray's to a sweep by name. A
    sandbox made under a stray's id meanwhile waits until the stray is gone."""

    async def scenario() -> None:
        left = await driver.start("microvm-left", app_spec(app_rootfs))
        left_key = record_of(left).key
        strays = await driver.find_strays(set())
        assert strays.ids == [left.sandbox_id] and left_key in strays.keys
        made_since = await driver.start("microvm-made-since", app_spec(app_rootfs))
        # Made again under the stray's id (a start a crash interrupted): waits for the stray to go.
        again = asyncio.create_task(driver.start(left.sandbox_id, app_spec(app_rootfs)))
        try:
            assert record_of(made_since).key not in strays.keys
            assert await driver.remove_strays(strays) == [left.sandbox_id]
            assert not driver.cgroup_of(left).exists()
            assert [name for name in driver.namespaces(driver.names_of(left)) if netns.exists(name)] == []
            assert (await http(driver, made_since))[0] == 200
            assert all(netns.exists(name) for name in driver.namespaces(driver.names_of(made_since)))
            restarted = await again
            assert record_of(restarted).key != left_key
            assert (await http(driver, restarted))[0] == 200
        finally:
            await driver.destroy(made_since)
            await asyncio.gather(again, return_exceptions=True)
            if again.done() and not again.cancelled() and again.exception() is None:
                await driver.destroy(again.result())

    run(scenario())


def test_no_runtime_path_asks_runsc_about_a_frozen_sandbox(
    driver: BaseDriver, app_rootfs: Path, cache_dir: Path
) -> None:
    """`runsc state` and `runsc list` hang on a frozen sandbox (warm or suspended in memory):
    adopting, destroying and sweeping one never run them, and every runsc command has a timeout."""
    gvisor_only(driver)
    again = restarted(driver, cache_dir)
    assert isinstance(again, GVisorDriver)
    calls: list[tuple[str, float]] = []
    original = again.commands.run

    async def recording(args: list[str], **options: Any) -> Any:
        calls.append((args[0], options.get("timeout", 120.0)))
        return await original(args, **options)

    again.commands.run = recording  # type: ignore[method-assign]

    async def scenario() -> None:
        sandbox = await driver.start("microvm-frozen", app_spec(app_rootfs))
        try:
            await http(driver, sandbox)
            await driver.suspend(sandbox)  # frozen in memory (the default first tier)
            adopted = await again.adopt(sandbox.sandbox_id)
            assert adopted is not None and again.is_suspended(adopted)
            assert await asyncio.wait_for(again.cleanup_strays(set()), 60) == [sandbox.sandbox_id]
        finally:
            await again.close()
            await driver.close()
            await driver.destroy(sandbox)

    run(scenario())
    assert calls and not [call for call in calls if call[0] in ("state", "list")], calls
    assert all(0 < timeout <= 600 for _, timeout in calls), calls
