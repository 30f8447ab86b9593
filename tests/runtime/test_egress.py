"""Internet egress of sandboxes (SandboxSpec.egress, runtime/egress.py), against a stand-in internet.

The "internet" is a network namespace of the test's own on 198.18.0.0/15 (tests/builder/
fake_internet.py), reached through the host like any outside address. A sandbox with egress
connects to it; one without does not; and egress never opens the host, link-local addresses or
other sandboxes. Stand-in LANs on private ranges (namespaces of the test's own on /30s no route of
the host uses) are refused, but for the networks the driver is told to allow and DNS to a private
resolver.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from openmicrovm.config import Settings
from openmicrovm.hostnet import dns as hostnet_dns
from openmicrovm.hostnet import policies
from openmicrovm.hostnet.addresses import allowed_networks
from openmicrovm.hostnet.dns import resolv_conf
from openmicrovm.runtime import Sandbox, make_driver
from openmicrovm.runtime import egress as uplinks
from openmicrovm.runtime.base import BaseDriver
from openmicrovm.runtime.records import record_of
from tests.builder.fake_internet import FakeInternet, fake_internet
from tests.runtime.conftest import run
from tests.runtime.helpers import app_spec, http, probe, warm_pool_key
from tests.runtime.test_sandboxes import HostListener, host_addresses


@pytest.fixture
def internet() -> Iterator[FakeInternet]:
    with fake_internet() as made:
        yield made


@pytest.fixture
def egress_driver(driver: BaseDriver) -> BaseDriver:
    if not driver.capabilities.internet_egress:
        pytest.skip(f"the {driver.name} driver gives sandboxes no network egress")
    return driver


def _uplink_objects(index: int) -> list[str]:
    """What is left on the host of uplink slot `index`."""
    found = []
    if Path("/sys/class/net", uplinks.host_link(index)).exists():
        found.append(f"link {uplinks.host_link(index)}")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout.splitlines()
    if f"table inet {uplinks.table_name(index)}" in tables:
        found.append(f"table {uplinks.table_name(index)}")
    if uplinks.lease_path(index).exists():
        found.append(f"lease {uplinks.lease_path(index)}")
    return found


def _uplink_address(sandbox: Sandbox) -> str:
    """The address of the sandbox's end of its uplink (in its peer namespace)."""
    subnet = uplinks.uplink_subnet(record_of(sandbox).uplink, policies.for_microvms(Settings()))
    return str(subnet.network_address + 2)


async def _snapshot(driver: BaseDriver, rootfs: Path, snapshot_dir: Path) -> None:
    sandbox = await driver.start("build-egress", app_spec(rootfs))
    try:
        await http(driver, sandbox)
        await driver.snapshot(sandbox, snapshot_dir)
    except BaseException:
        await driver.destroy(sandbox)
        raise


async def _reaches(driver: BaseDriver, sandbox: Sandbox, target: str) -> bool:
    return (await probe(driver, sandbox, [target]))[target] == "connected"


def test_egress_reaches_the_internet_and_nothing_of_the_host(
    egress_driver: BaseDriver, app_rootfs: Path, tmp_path: Path, internet: FakeInternet
) -> None:
    driver = egress_driver
    outside = f"{internet.address}:{internet.silent_port()}"
    loopback, everywhere = HostListener("127.0.0.1"), HostListener("0.0.0.0")

    async def scenario() -> None:
        await _snapshot(driver, app_rootfs, tmp_path / "snap")
        open_box = await driver.restore("microvm-egress", tmp_path / "snap", egress=True)
        boxes = [open_box]
        try:
            closed_box = await driver.restore("microvm-closed", tmp_path / "snap")
            boxes.append(closed_box)
            other = await driver.restore("microvm-other", tmp_path / "snap", egress=True)
            boxes.append(other)
            assert await _reaches(driver, open_box, outside)
            # Refused at once, as if nothing listened (an app's DNS lookup must not wait for its
            # timeout), not dropped.
            closed = await probe(driver, closed_box, [outside])
            assert closed[outside].startswith("ConnectionRefusedError"), closed
            forbidden = [f"127.0.0.1:{loopback.port}", f"169.254.77.1:{everywhere.port}"]
            forbidden += [f"{address}:{everywhere.port}" for address in host_addresses()]
            forbidden += [f"{internet.host_address}:{everywhere.port}", "169.254.169.254:80"]
            forbidden += [f"{_uplink_address(other)}:8080", f"{_uplink_address(other)}:{everywhere.port}"]
            results = await probe(driver, open_box, forbidden)
            assert all(result != "connected" for result in results.values()), results
            # DNS: the host's reachable resolvers, as a build gets them.
            _, servers = resolv_conf("an image build")
            _, body = await http(driver, open_box, "/read?path=/etc/resolv.conf")
            assert all(f"nameserver {server}" in body["text"] for server in servers), body
            used = [record_of(box).uplink for box in (open_box, other)]
            assert all(index >= 0 for index in used)
        finally:
            for box in boxes:
                await driver.destroy(box)
        assert loopback.accepted == 0 and everywhere.accepted == 0
        for index in used:
            assert not _uplink_objects(index)

    try:
        run(scenario())
    finally:
        loopback.close()
        everywhere.close()


def test_egress_survives_suspend_resume_and_the_warm_pool(
    egress_driver: BaseDriver, app_rootfs: Path, tmp_path: Path, cache_dir: Path, internet: FakeInternet
) -> None:
    driver = egress_driver
    outside = f"{internet.address}:{internet.silent_port()}"

    async def scenario() -> None:
        await _snapshot(driver, app_rootfs, tmp_path / "snap")
        boxes: list[Sandbox] = []
        try:
            for name in ("microvm-e1", "microvm-e2"):  # the second restore makes the snapshot hot
                boxes.append(await driver.restore(name, tmp_path / "snap", egress=name.endswith("1")))
            warm_key = await warm_pool_key(driver)  # the pool fills in the background
            pooled = await driver.restore("microvm-e3", tmp_path / "snap", egress=True)
            boxes.append(pooled)
            assert record_of(pooled).key == warm_key
            assert await _reaches(driver, pooled, outside)
            assert not await _reaches(driver, boxes[1], outside)  # e2: no egress asked for
            await driver.suspend(pooled)  # frozen in memory
            await driver.resume(pooled)
            assert await _reaches(driver, pooled, outside)
            to_disk = make_driver(driver.name, driver.state_root, cache_dir, suspend_to_disk_after=0)
            await to_disk.suspend(pooled)
            assert record_of(pooled).suspended_in == "disk"
            await to_disk.resume(pooled)
            assert await _reaches(driver, pooled, outside)
            assert await _reaches(driver, boxes[0], outside)  # e1: a cold restore with egress
            await driver.close()  # the warm sandbox made after e3 goes with the pool
        finally:
            used = [record_of(box).uplink for box in boxes]
            for box in boxes:
                await driver.destroy(box)
        for index in used:
            if index >= 0:
                assert not _uplink_objects(index)

    run(scenario())


@pytest.fixture
def lans() -> Iterator[list[FakeInternet]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(fake_internet(within)) for within in ("172.16.0.0/12", "192.168.0.0/16")]


def test_egress_refuses_private_networks_but_the_allowed_ones_and_the_resolver(
    egress_driver: BaseDriver,
    app_rootfs: Path,
    tmp_path: Path,
    cache_dir: Path,
    internet: FakeInternet,
    lans: list[FakeInternet],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driver = egress_driver
    allowed, other = lans
    # The host's resolver is private (as a VPC's or a home router's is): reachable on port 53 only.
    (tmp_path / "host-resolv.conf").write_text(f"nameserver {other.address}\n")
    monkeypatch.setattr(hostnet_dns, "_HOST_RESOLV_CONF", tmp_path / "host-resolv.conf")
    outside = f"{internet.address}:{internet.silent_port()}"
    lan, other_lan = f"{allowed.address}:{allowed.silent_port()}", f"{other.address}:{other.silent_port()}"
    dns = f"{other.address}:{other.silent_port(53)}"
    host_end = HostListener(allowed.host_address)  # the host's own end of the allowed /30
    to_host = f"{allowed.host_address}:{host_end.port}"
    targets = [outside, lan, other_lan, dns, to_host]

    others: list[BaseDriver] = []

    def driver_allowing(*networks: str) -> BaseDriver:
        """Another server's driver on the same state (a restart with other settings)."""
        egress = replace(policies.for_microvms(Settings()), allowed=allowed_networks(networks))
        made = make_driver(driver.name, driver.state_root, cache_dir, restore_pool_size=0, egress=egress)
        assert isinstance(made, BaseDriver)
        others.append(made)
        return made

    opening = driver_allowing(str(allowed.network))

    async def reached(by: BaseDriver, sandbox: Sandbox) -> set[str]:
        results = await probe(by, sandbox, targets)
        return {target for target, result in results.items() if result == "connected"}

    async def scenario() -> None:
        await _snapshot(driver, app_rootfs, tmp_path / "snap")
        boxes: list[Sandbox] = []
        try:
            boxes.append(await driver.restore("microvm-private", tmp_path / "snap", egress=True))
            boxes.append(await opening.restore("microvm-allowed", tmp_path / "snap", egress=True))
            denying, allowing = boxes
            _, body = await http(driver, denying, "/read?path=/etc/resolv.conf")
            assert f"nameserver {other.address}" in body["text"], body
            assert await reached(driver, denying) == {outside, dns}
            assert await reached(opening, allowing) == {outside, lan, dns}
            # Sandboxes outlive the server: the next one's settings hold for those it adopts.
            readopted = await driver_allowing(str(allowed.network)).adopt("microvm-private")
            assert readopted is not None and await reached(opening, readopted) == {outside, lan, dns}
            readopted = await driver_allowing().adopt("microvm-allowed")
            assert readopted is not None and await reached(opening, readopted) == {outside, dns}
        finally:
            used = [record_of(box).uplink for box in boxes]
            for box in boxes:
                await driver.destroy(box)
            for made in others:
                await made.close()
        for index in used:
            assert not _uplink_objects(index)

    try:
        run(scenario())
    finally:
        host_end.close()
    assert host_end.accepted == 0
