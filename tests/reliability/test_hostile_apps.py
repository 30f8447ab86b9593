"""Hostile tenants: apps that fork-bomb, fill their disk, allocate past their memory, try to reach
the host, or whose endpoint is flooded. Each stays inside its sandbox's limits and ends in a clear
state or error, while a neighbour MicroVM, the API and the host carry on unaffected; terminating
the hostile MicroVM leaves nothing behind."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.invariants import HostView, host_key, settled_violations
from tests.reliability.loadgen import LOG_FILES_KEPT_OPEN, Sample
from tests.reliability.microvms import Fleet, fleet
from tests.reliability.rawhttp import Exchange, exchange
from tests.support.endpoint import auth_token, call
from tests.support.images import wait_microvm
from tests.support.moto import MotoServer
from tests.support.server import ServerProcess

MIB = 1024 * 1024
LIMIT_MIB = 512  # the tenant image's memory


@pytest.fixture(scope="module")
def neighbour(hostile_server: ServerProcess, tenant_image: str) -> Iterator[tuple[dict[str, Any], str]]:
    """A well-behaved tenant that must keep answering while the others misbehave."""
    with fleet(hostile_server.client()) as running:
        vm = running.run(tenant_image)
        yield vm, auth_token(hostile_server.client(), vm["microvmId"], minutes=60)


def _neighbour_fine(server: ServerProcess, neighbour: tuple[dict[str, Any], str]) -> None:
    vm, token = neighbour
    response = call(server, vm["endpoint"], token, "/count")
    assert response.status == 200, (response.status, response.body)
    assert server.client().get_microvm(microvmIdentifier=vm["microvmId"])["state"] == "RUNNING"


def _cgroup(server: ServerProcess, microvm_id: str, controller: str) -> Path:
    scope = HostView(server.data_dir).scopes()["gvisor"]
    return (
        Path("/sys/fs/cgroup") / controller / f"openmicrovm-{scope}" / host_key(server.data_dir, microvm_id)
    )


def _leftovers(server: ServerProcess, microvm_id: str) -> list[str]:
    assert server.process is not None
    return [
        p for p in settled_violations(server.data_dir, frozenset({server.process.pid})) if microvm_id in p
    ]


def _terminate(server: ServerProcess, vm: dict[str, Any]) -> None:
    client = server.client()
    client.terminate_microvm(microvmIdentifier=vm["microvmId"])
    assert wait_microvm(client, vm["microvmId"], {"TERMINATED"}, timeout=60)["state"] == "TERMINATED"
    assert _leftovers(server, vm["microvmId"]) == []


def _raw(
    server: ServerProcess, endpoint: str, token: str, method: str, path: str, timeout: float = 120
) -> Exchange:
    length = "Content-Length: 0\r\n" if method == "POST" else ""
    return exchange(
        server.port,
        f"{method} {path} HTTP/1.1\r\nHost: {endpoint}\r\nX-aws-proxy-auth: {token}\r\n{length}"
        "Connection: close\r\n\r\n".encode(),
        timeout=timeout,
    )


def _host_processes() -> int:
    return sum(entry.name.isdigit() for entry in Path("/proc").iterdir())


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


# ------------------------------------------------------------------------------ fork bomb


def test_a_fork_bomb_stays_in_its_sandbox(
    hostile_server: ServerProcess, tenant_image: str, neighbour: tuple[dict[str, Any], str]
) -> None:
    before = _host_processes()
    with fleet(hostile_server.client()) as running:
        vm = running.run(tenant_image)
        token = auth_token(hostile_server.client(), vm["microvmId"])
        assert _raw(hostile_server, vm["endpoint"], token, "POST", "/forkbomb").status == 202
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            _neighbour_fine(hostile_server, neighbour)
            assert hostile_server.client().list_managed_microvm_images()["items"]
            # gVisor's tasks are not host processes: the bomb cannot exhaust the host's pid space.
            assert _host_processes() < before + 200
            time.sleep(0.5)
        # The bombed app answers, or (its sandbox killed at its memory limit) the endpoint says 502.
        assert _raw(hostile_server, vm["endpoint"], token, "GET", "/count").status in (200, 502)
        _terminate(hostile_server, vm)
    _neighbour_fine(hostile_server, neighbour)


# ------------------------------------------------------------------------------ memory and disk


@dataclass
class Attack:
    """One hostile request against a MicroVM of its own, and what came of it."""

    vm: dict[str, Any]
    answer: Exchange
    peak_memory: int
    after: int | None  # status of a plain request once the attack is over


class PeakMemory:
    """The highest memory.max_usage_in_bytes read from a MicroVM's cgroup while it exists: a sandbox
    killed at its limit is destroyed (cgroup and all) at once, so reading only afterwards is too late."""

    def __init__(self, path: Path) -> None:
        self.path, self.peak, self._stop = path, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, int(self.path.read_text()))
            except (OSError, ValueError):
                pass  # not there yet, or gone with its sandbox

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _attack(server: ServerProcess, running: Fleet, image: str, path: str) -> Attack:
    vm = running.run(image)
    token = auth_token(server.client(), vm["microvmId"])
    sampler = PeakMemory(_cgroup(server, vm["microvmId"], "memory") / "memory.max_usage_in_bytes")
    answer = _raw(server, vm["endpoint"], token, "POST", path)
    after = _raw(server, vm["endpoint"], token, "GET", "/count").status
    peak = sampler.stop()
    assert peak > 0, "the MicroVM's memory cgroup was never seen"
    return Attack(vm, answer, peak, after)


def _stopped_at_its_limit_or_running(server: ServerProcess, attack: Attack) -> None:
    """A sandbox that went at its memory limit leaves its MicroVM TERMINATED saying so."""
    vm = server.client().get_microvm(microvmIdentifier=attack.vm["microvmId"])
    if vm["state"] != "RUNNING":
        vm = wait_microvm(server.client(), attack.vm["microvmId"], {"TERMINATED"}, timeout=30)
        assert "memory limit" in vm.get("stateReason", ""), vm


@pytest.fixture(scope="module")
def attacks(rampage: Rampage) -> dict[str, Attack]:
    return rampage.attacks


def test_memory_past_the_limit_is_stopped_at_the_limit(
    hostile_server: ServerProcess, attacks: dict[str, Attack], neighbour: tuple[dict[str, Any], str]
) -> None:
    attack = attacks["memory"]
    assert attack.peak_memory <= (LIMIT_MIB + 16) * MIB, f"peak {attack.peak_memory // MIB} MiB"
    if attack.answer.status == 200:  # the app saw its child killed...
        assert json.loads(attack.answer.body) != {"exit": 0}, "4x the memory limit was allocated"
    # ...or the whole sandbox went at its limit: its endpoint answers 502 from then on, never hangs.
    assert attack.after in (200, 502), attack.after
    _stopped_at_its_limit_or_running(hostile_server, attack)
    _neighbour_fine(hostile_server, neighbour)


def test_filling_the_disk_fills_the_sandbox_not_the_host(
    hostile_server: ServerProcess, attacks: dict[str, Attack], neighbour: tuple[dict[str, Any], str]
) -> None:
    attack = attacks["disk"]
    assert attack.peak_memory <= (LIMIT_MIB + 16) * MIB, f"peak {attack.peak_memory // MIB} MiB"
    if attack.answer.status == 200:
        outcome = json.loads(attack.answer.body)
        assert outcome["written"] < 4 * LIMIT_MIB * MIB and outcome["error"], outcome
    assert attack.after in (200, 502), attack.after
    _stopped_at_its_limit_or_running(hostile_server, attack)
    _neighbour_fine(hostile_server, neighbour)


def test_a_request_in_flight_when_its_sandbox_dies_gets_a_502(attacks: dict[str, Attack]) -> None:
    for name, attack in attacks.items():
        assert attack.answer.status in (200, 502), (name, attack.answer)


# ------------------------------------------------------------------------------ network


def test_an_app_cannot_reach_the_host_or_other_sandboxes(
    hostile_server: ServerProcess, tenant_image: str, moto: MotoServer, neighbour: tuple[dict[str, Any], str]
) -> None:
    host_address = socket.gethostbyname(socket.gethostname())
    targets = [
        f"127.0.0.1:{hostile_server.port}",
        f"{host_address}:{hostile_server.port}",
        f"127.0.0.1:{moto.port}",
        f"{host_address}:{moto.port}",
        f"169.254.77.1:{hostile_server.port}",  # the host end of the sandbox's own veth
        "169.254.77.1:22",
        "169.254.169.254:80",
    ]
    with fleet(hostile_server.client()) as running:
        vm = running.run(tenant_image)
        token = auth_token(hostile_server.client(), vm["microvmId"])
        answer = call(hostile_server, vm["endpoint"], token, f"/probe?targets={','.join(targets)}")
        assert answer.status == 200, answer.body
        reached = {
            target: result for target, result in json.loads(answer.body).items() if result == "connected"
        }
        assert reached == {}


# ------------------------------------------------------------------------------ flood


def _flood_one(server: ServerProcess, endpoint: str, token: str, path: str) -> str:
    """One request of a flood: its status, or what happened instead."""
    answer = _raw(server, endpoint, token, "GET", path, timeout=90)
    if answer.timed_out:
        return "timed out"
    return str(answer.status) if answer.status else f"closed ({answer.error or 'no answer'})"


@dataclass
class Flood:
    outcomes: collections.Counter[str]
    recovered: int | None  # a plain request to the flooded MicroVM once the flood is over
    pid_limit_hits: int  # times the flooded MicroVM's pids cgroup refused a new task
    vm: dict[str, Any]


def _flood(server: ServerProcess, running: Fleet, image: str) -> Flood:
    """600 requests, 200 at a time, at one MicroVM."""
    vm = running.run(image)
    token = auth_token(server.client(), vm["microvmId"])
    paths = ["/slow?seconds=3", "/count"] * 300
    with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
        outcomes = collections.Counter(
            pool.map(lambda path: _flood_one(server, vm["endpoint"], token, path), paths)
        )
    recovered = call(server, vm["endpoint"], token, "/count").status
    events = (_cgroup(server, vm["microvmId"], "pids") / "pids.events").read_text().split()
    limit_hits = int(events[events.index("max") + 1]) if "max" in events else 0
    print(f"flood outcomes: {dict(outcomes)}; afterwards {recovered}; pids limit hit {limit_hits} time(s)")
    return Flood(outcomes, recovered, limit_hits, vm)


@dataclass
class Rampage:
    attacks: dict[str, Attack]
    flood: Flood
    before: Sample
    after: Sample


@pytest.fixture(scope="module")
def rampage(
    hostile_server: ServerProcess, tenant_image: str, neighbour: tuple[dict[str, Any], str]
) -> Iterator[Rampage]:
    """Three hostile tenants at once: one allocates 4x its memory, one writes 4x its memory to its
    disk, one's endpoint is flooded; meanwhile the neighbour and the API are asked every second."""
    assert hostile_server.process is not None
    pid, logs = hostile_server.process.pid, hostile_server.data_dir / "logs"
    before = Sample.of(pid, logs, hostile_server.database_url)
    free_before = shutil.disk_usage(hostile_server.data_dir).free
    data_before = _tree_bytes(hostile_server.data_dir)
    running = Fleet(hostile_server.client())
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            memory = pool.submit(
                _attack, hostile_server, running, tenant_image, f"/eat-memory?mib={4 * LIMIT_MIB}"
            )
            disk = pool.submit(
                _attack, hostile_server, running, tenant_image, f"/fill-disk?mib={4 * LIMIT_MIB}"
            )
            flooding = pool.submit(_flood, hostile_server, running, tenant_image)
            while not (memory.done() and disk.done() and flooding.done()):
                _neighbour_fine(hostile_server, neighbour)
                assert hostile_server.client().list_managed_microvm_images()["items"]
                time.sleep(1)
        # Files land in the sandbox's memory-backed writable layer (runsc --overlay2=root:memory).
        assert _tree_bytes(hostile_server.data_dir) - data_before < 64 * MIB
        assert free_before - shutil.disk_usage(hostile_server.data_dir).free < 1024 * MIB
        done = Rampage({"memory": memory.result(), "disk": disk.result()}, flooding.result(), before, before)
        for vm in [*(attack.vm for attack in done.attacks.values()), done.flood.vm]:
            _terminate(hostile_server, vm)
        deadline = time.monotonic() + 30
        done.after = Sample.of(pid, logs, hostile_server.database_url)
        while done.after.fds > before.fds + 5 and time.monotonic() < deadline:
            time.sleep(0.5)
            done.after = Sample.of(pid, logs, hostile_server.database_url)
        yield done
    finally:
        running.terminate_all()


@pytest.fixture(scope="module")
def flood(rampage: Rampage) -> Flood:
    return rampage.flood


def test_a_flooded_endpoint_does_not_starve_its_neighbours(
    hostile_server: ServerProcess, rampage: Rampage, neighbour: tuple[dict[str, Any], str]
) -> None:
    flood = rampage.flood
    statuses = {int(o) for o in flood.outcomes if o.isdigit()}
    assert statuses <= {200, 429, 502, 503}, flood.outcomes
    assert flood.outcomes["200"] > 0, flood.outcomes
    assert flood.recovered in (200, 502)  # the flooded MicroVM answers, or says it is gone: no hang
    _neighbour_fine(hostile_server, neighbour)


def test_the_server_lets_go_of_every_hostile_connection(rampage: Rampage) -> None:
    assert rampage.after.fds <= rampage.before.fds + 5, (rampage.before, rampage.after)
    assert rampage.after.children <= rampage.before.children, (rampage.before, rampage.after)
    assert rampage.after.log_fds <= LOG_FILES_KEPT_OPEN


def test_a_flood_does_not_kill_the_flooded_microvm(flood: Flood) -> None:
    assert (flood.recovered, flood.pid_limit_hits) == (200, 0), flood


def test_every_request_of_a_flood_gets_an_http_answer(flood: Flood) -> None:
    unanswered = {outcome: n for outcome, n in flood.outcomes.items() if not outcome.isdigit()}
    assert unanswered == {}, flood.outcomes
