"""Builds are contained: RUN steps and buildah's own fetches see their own processes and network
only, reach the outside world (a test namespace standing in for it) but nothing on the host, cannot
escape the chroot, and everything the containment creates is gone after every build."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from openmicrovm.builder import container_build
from openmicrovm.builder.build_network import (
    BuildNetwork,
    _Names,
    cleanup_build_networks,
    open_build_network,
)
from openmicrovm.builder.buildah import BuildahStore
from openmicrovm.builder.container_build import build_image
from openmicrovm.builder.errors import CONTAINER_BUILD_FAILED, BuildFailed
from openmicrovm.config import Settings, load_settings
from openmicrovm.hostnet import addresses, dns, firewall, policies
from openmicrovm.hostnet.addresses import EgressPolicy, IPNetwork
from openmicrovm.hostnet.dns import resolv_conf
from openmicrovm.hostnet.errors import HostNetworkError
from tests.builder.conftest import assert_store_clean
from tests.builder.fake_internet import FakeInternet, fake_internet, in_netns
from tests.builder.test_container_build import build, make_context

BASE = "FROM public.ecr.aws/lambda/microvms:al2023-minimal\n"

# Each attempt prints one `PROBE {"name", "ok", "detail"}` line; the build itself succeeds.
PROBE_PRELUDE = textwrap.dedent(
    """
    import json, os, socket, subprocess, urllib.request

    def attempt(name, action):
        try:
            result = {"ok": True, "detail": repr(action())[:300]}
        except Exception as error:
            result = {"ok": False, "detail": f"{type(error).__name__}: {error}"[:300]}
        print("PROBE " + json.dumps({"name": name, **result}), flush=True)

    def connect(host, port):
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            return sock.recv(100)

    def gateway():
        for line in open("/proc/net/route").read().splitlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                return socket.inet_ntoa(bytes.fromhex(fields[2])[::-1])
        raise RuntimeError("no default route")
    """
)


# Settings from these variables only: no settings file of this machine's.
SETTINGS_ENV = {
    "OPENMICROVM_SYSTEM_CONFIG": "/nonexistent/openmicrovm.toml",
    "OPENMICROVM_DATA_DIR": "/nonexistent",
}


def run_probe(
    store: BuildahStore,
    root: Path,
    script: str,
    extra: str = "",
    files: dict[str, str] | None = None,
    egress: EgressPolicy | None = None,
) -> tuple[dict[str, dict[str, object]], list[str]]:
    """Build a Dockerfile whose RUN step runs PROBE_PRELUDE + `script`; returns the results."""
    dockerfile = BASE + extra + "COPY probe.py /probe.py\nRUN python3 /probe.py\n"
    context = make_context(
        root / "context",
        {"Dockerfile": dockerfile, "probe.py": PROBE_PRELUDE + textwrap.dedent(script), **(files or {})},
    )
    log: list[str] = []
    asyncio.run(build_image(store, context, context.parent / "iid", log.append, egress=egress))
    results = {}
    for line in log:
        if line.startswith("PROBE "):
            entry = json.loads(line.removeprefix("PROBE "))
            results[entry["name"]] = entry
    return results, log


@pytest.fixture(scope="module")
def internet() -> Iterator[FakeInternet]:
    with fake_internet() as namespace:
        yield namespace


class _Listener:
    """A TCP listener on the host that records whether anything connected."""

    def __init__(self, address: str) -> None:
        self.socket = socket.socket()
        self.socket.bind((address, 0))
        self.socket.listen(8)
        self.socket.setblocking(False)
        self.address = address
        self.port = int(self.socket.getsockname()[1])

    def connected(self) -> bool:
        try:
            connection, _ = self.socket.accept()
        except BlockingIOError:
            return False
        connection.close()
        return True

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def networks(monkeypatch: pytest.MonkeyPatch) -> list[BuildNetwork]:
    """Every build network the builds of the test open, in order."""
    opened: list[BuildNetwork] = []
    real = container_build.open_build_network

    async def recording(policy: EgressPolicy | None = None) -> BuildNetwork:
        network = await real(policy)
        opened.append(network)
        return network

    monkeypatch.setattr(container_build, "open_build_network", recording)
    return opened


def _objects_of(names: _Names) -> list[str]:
    """The host objects of a build network that still exist."""
    tables = subprocess.run(["nft", "list", "tables", "inet"], capture_output=True, text=True).stdout
    found = []
    if Path("/run/netns", names.netns).exists():
        found.append(f"netns {names.netns}")
    if Path("/sys/class/net", names.host_link).exists():
        found.append(f"link {names.host_link}")
    if f"table inet {names.table}\n" in tables + "\n":
        found.append(f"nft table {names.table}")
    found += [str(path) for path in (names.resolv_conf, names.lease_path) if path.exists()]
    return found


def test_a_run_step_sees_and_signals_only_its_own_processes(store: BuildahStore, tmp_path: Path) -> None:
    marker = f"900.{uuid.uuid4().int % 10**6:06d}"
    victim = subprocess.Popen(["sleep", marker])
    try:
        results, _ = run_probe(
            store,
            tmp_path,
            f"""
            def host_processes():
                found = []
                for entry in os.listdir("/proc"):
                    if entry.isdigit():
                        try:
                            if b"{marker}" in open(f"/proc/{{entry}}/cmdline", "rb").read():
                                found.append(entry)
                        except OSError:
                            pass
                return found
            attempt("processes", lambda: sorted(int(e) for e in os.listdir("/proc") if e.isdigit()))
            attempt("host victim visible", host_processes)
            attempt("host victim by pid", lambda: os.stat("/proc/{victim.pid}"))
            attempt("kill host victim", lambda: os.kill({victim.pid}, 9))
            attempt("init", lambda: open("/proc/1/cmdline", "rb").read().split(b"\\0")[0])
            attempt("read init's root", lambda: os.listdir("/proc/1/root"))
            """,
        )
        assert results["host victim visible"] == {"name": "host victim visible", "ok": True, "detail": "[]"}
        assert results["host victim by pid"]["ok"] is False, results
        assert results["kill host victim"]["ok"] is False, results
        assert victim.poll() is None, "a RUN step killed a host process"
        # A PID namespace of its own: buildah is its init and only the build's processes exist.
        assert results["init"]["detail"] == "b'buildah'", results
        assert max(json.loads(str(results["processes"]["detail"]))) < 200, results
        # buildah runs outside the chroot with more capabilities: its root is not the RUN step's door.
        assert results["read init's root"]["ok"] is False, results
    finally:
        victim.kill()
        victim.wait()


def test_a_run_step_reaches_the_outside_but_nothing_on_the_host(
    store: BuildahStore, tmp_path: Path, internet: FakeInternet, networks: list[BuildNetwork]
) -> None:
    port = internet.serve_files({"/hello": b"hello from the internet"})
    loopback = _Listener("127.0.0.1")
    host_address = _Listener(internet.host_address)  # an address of the host on another interface
    try:
        results, _ = run_probe(
            store,
            tmp_path,
            f"""
            attempt("internet", lambda: urllib.request.urlopen(
                "http://{internet.address}:{port}/hello", timeout=10).read())
            attempt("ADD from the internet", lambda: open("/hello.txt").read())
            attempt("host loopback", lambda: connect("127.0.0.1", {loopback.port}))
            attempt("host address", lambda: connect("{internet.host_address}", {host_address.port}))
            attempt("link-local", lambda: connect("169.254.169.254", 80))
            attempt("resolv.conf", lambda: open("/etc/resolv.conf").read())
            """,
            extra=f"ADD http://{internet.address}:{port}/hello /hello.txt\n",
        )
    finally:
        reached = [listener.address for listener in (loopback, host_address) if listener.connected()]
        loopback.close()
        host_address.close()
    assert results["internet"] == {
        "name": "internet",
        "ok": True,
        "detail": "b'hello from the internet'",
    }, results
    assert results["ADD from the internet"]["detail"] == "'hello from the internet'", results
    for name in ("host loopback", "host address", "link-local"):
        assert results[name]["ok"] is False, results[name]
    # Refused at once rather than left to time out.
    assert "ConnectionRefusedError" in str(results["host address"]["detail"]), results
    assert reached == [], f"a RUN step reached host listeners on {reached}"
    _, nameservers = resolv_conf("an image build")
    for server in nameservers:
        assert f"nameserver {server}" in str(results["resolv.conf"]["detail"]), results
    assert len(networks) == 1 and _objects_of(networks[0].names) == []


def test_destinations_the_operator_denies_are_refused(
    store: BuildahStore, tmp_path: Path, internet: FakeInternet
) -> None:
    port = internet.serve_files({"/hello": b"hello"})
    denied = ipaddress.IPv4Network(f"{internet.address}/30", strict=False)
    # Overlapping networks, as an operator may list them (env OPENMICROVM_BUILD_EGRESS_DENY).
    settings = load_settings(
        environ={**SETTINGS_ENV, "OPENMICROVM_BUILD_EGRESS_DENY": f"127.0.0.0/8, 198.18.0.0/15, {denied}"}
    )
    results, _ = run_probe(
        store,
        tmp_path,
        f'attempt("denied", lambda: connect("{internet.address}", {port}))\n',
        egress=policies.for_builds(settings),
    )
    assert results["denied"]["ok"] is False, results


# Stand-ins for the operator's LAN: namespaces of the test's own on /30s of private ranges that no
# route of this host overlaps (fake_internet picks them), so nothing leaves the machine. Not 10/8,
# which holds the builds' and sandboxes' own subnets (a route there makes builds refuse to start);
# _RulesBench covers it.
PRIVATE_RANGES = ("172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")

# Connects and hangs up at once (the LANs' silent ports never answer a request).
REACH = """
def reach(host, port):
    socket.create_connection((host, port), timeout=5).close()
    return "connected"
"""


@pytest.fixture
def lans() -> Iterator[list[FakeInternet]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(fake_internet(within)) for within in PRIVATE_RANGES]


def _reach_all(targets: dict[str, tuple[str, int]]) -> str:
    return REACH + "".join(
        f'attempt("{name}", lambda: reach("{host}", {port}))\n' for name, (host, port) in targets.items()
    )


def test_a_run_step_cannot_reach_private_networks(
    store: BuildahStore, tmp_path: Path, internet: FakeInternet, lans: list[FakeInternet]
) -> None:
    targets = {lan.address: (lan.address, lan.silent_port()) for lan in lans}
    targets["internet"] = (internet.address, internet.silent_port())
    results, _ = run_probe(store, tmp_path, _reach_all(targets))
    assert results["internet"]["ok"] is True, results  # a public-looking address, as before
    for lan in lans:
        # Refused at once by the host (ICMP admin-prohibited), rather than left to time out.
        assert results[lan.address]["ok"] is False, results
        assert "No route to host" in str(results[lan.address]["detail"]), results
        assert lan.accepted == 0


def test_egress_allow_networks_opens_exactly_the_named_network(
    store: BuildahStore, tmp_path: Path, internet: FakeInternet, lans: list[FakeInternet]
) -> None:
    allowed, *others = lans
    # The host's own end of the allowed /30: allowing a network never opens the host itself.
    host_end = _Listener(allowed.host_address)
    targets = {lan.address: (lan.address, lan.silent_port()) for lan in lans}
    targets["internet"] = (internet.address, internet.silent_port())
    targets["host end"] = (host_end.address, host_end.port)
    try:
        opening = replace(policies.for_builds(Settings()), allowed=(allowed.network,))
        results, _ = run_probe(store, tmp_path, _reach_all(targets), egress=opening)
    finally:
        reached_host = host_end.connected()
        host_end.close()
    assert results[allowed.address]["ok"] is True, results
    assert results["internet"]["ok"] is True, results
    for other in others:
        assert results[other.address]["ok"] is False and other.accepted == 0, results
    assert results["host end"]["ok"] is False and not reached_host, results


def test_a_private_resolver_is_reachable_on_port_53_only(
    store: BuildahStore, tmp_path: Path, lans: list[FakeInternet], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host's resolver is often private (a VPC's, a home router's): the build gets it in its
    resolv.conf and may reach it for DNS, and for nothing else."""
    resolver, other = lans[0], lans[1]
    (tmp_path / "host-resolv.conf").write_text(f"nameserver {resolver.address}\n")
    monkeypatch.setattr(dns, "_HOST_RESOLV_CONF", tmp_path / "host-resolv.conf")
    targets = {
        "dns": (resolver.address, resolver.silent_port(53)),
        "resolver's other port": (resolver.address, resolver.silent_port()),
        "port 53 of another private host": (other.address, other.silent_port(53)),
    }
    script = _reach_all(targets) + 'attempt("resolv.conf", lambda: open("/etc/resolv.conf").read())\n'
    results, _ = run_probe(store, tmp_path / "build", script)
    assert f"nameserver {resolver.address}" in str(results["resolv.conf"]["detail"]), results
    assert results["dns"]["ok"] is True, results
    assert results["resolver's other port"]["ok"] is False, results
    assert results["port 53 of another private host"]["ok"] is False, results
    assert other.accepted == 0


class _RulesBench:
    """egress_ruleset on a bench of three namespaces of the test's own, none joined to the host:
    `inner` (a build or sandbox) routed through `router` (holding the table, as the host does) to
    `outer` (its addresses stand for private and public destinations). Builds and sandboxes have
    no IPv6 today, so this is where the IPv6 rules are shown to hold; 10/8 too, which a stand-in
    LAN on the host would clash with."""

    INNER, ROUTER_IN, SUBNET = "10.213.255.254/30", "10.213.255.253/30", "10.213.255.252/30"
    INNER6, ROUTER_IN6 = "2001:db8:1::2/64", "2001:db8:1::1/64"
    # (router end, outer end) of each destination network.
    OUTER = {
        "10.99.0.0/24": ("10.99.0.1/24", "10.99.0.2"),
        "fd42:4242::/64": ("fd42:4242::1/64", "fd42:4242::2"),
        "fd99:9999::/64": ("fd99:9999::1/64", "fd99:9999::2"),
        "2001:db8:2::/64": ("2001:db8:2::1/64", "2001:db8:2::2"),
    }

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.inner, self.router, self.outer = (f"omvt-{tag}-{part}" for part in "iro")
        self._listeners: list[socket.socket] = []

    def __enter__(self) -> _RulesBench:
        try:
            self._make()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _make(self) -> None:
        def ip(*args: str) -> None:
            subprocess.run(["ip", *args], check=True, capture_output=True)

        for name in (self.inner, self.router, self.outer):
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
            # No duplicate address detection on the links made next: until it ends, their IPv6
            # link-local addresses are tentative, and the first packets are lost to neighbour
            # discovery.
            self._sysctl(name, "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0")
        for link, peer in (("in0", self.inner), ("out0", self.outer)):
            ip("-n", self.router, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", peer)
        ip("-n", self.inner, "addr", "add", self.INNER, "dev", "eth0")
        ip("-n", self.inner, "addr", "add", self.INNER6, "dev", "eth0", "nodad")
        ip("-n", self.router, "addr", "add", self.ROUTER_IN, "dev", "in0")
        ip("-n", self.router, "addr", "add", self.ROUTER_IN6, "dev", "in0", "nodad")
        for router_end, outer_address in self.OUTER.values():
            network = ipaddress.ip_network(router_end, strict=False)
            flags = ["nodad"] if network.version == 6 else []
            ip("-n", self.router, "addr", "add", router_end, "dev", "out0", *flags)
            ip("-n", self.outer, "addr", "add", f"{outer_address}/{network.prefixlen}", "dev", "eth0", *flags)
        for name, link in (
            (self.inner, "eth0"),
            (self.router, "in0"),
            (self.router, "out0"),
            (self.outer, "eth0"),
        ):
            ip("-n", name, "link", "set", link, "up")
        # Static IPv6 neighbours across the contained link: the table's input chain refuses all the
        # link sends to the router, neighbour solicitations included (a real contained link has
        # no IPv6 at all, so nothing there needs them).
        for here, link, there, there_link, address in (
            (self.inner, "eth0", self.router, "in0", self.ROUTER_IN6),
            (self.router, "in0", self.inner, "eth0", self.INNER6),
        ):
            shown = subprocess.run(
                ["ip", "-n", there, "-j", "link", "show", "dev", there_link], capture_output=True, text=True
            )
            mac = json.loads(shown.stdout)[0]["address"]
            ip(
                "-n",
                here,
                "neigh",
                "add",
                address.split("/")[0],
                "lladdr",
                mac,
                "dev",
                link,
                "nud",
                "permanent",
            )
        ip("-n", self.inner, "route", "add", "default", "via", self.ROUTER_IN.split("/")[0])
        ip("-n", self.inner, "-6", "route", "add", "default", "via", self.ROUTER_IN6.split("/")[0])
        ip("-n", self.outer, "-6", "route", "add", "default", "via", "2001:db8:2::1")
        self._sysctl(self.router, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")

    @staticmethod
    def _sysctl(netns: str, *settings: str) -> None:
        """Settings of one of the bench's namespaces (/proc/sys/net is per namespace)."""
        subprocess.run(
            ["ip", "netns", "exec", netns, "sysctl", "-qw", *settings], check=True, capture_output=True
        )

    def apply(self, allowed: Sequence[IPNetwork], resolvers: Sequence[str] = ()) -> None:
        subnet = ipaddress.IPv4Network(self.SUBNET)
        ruleset = firewall.egress_ruleset("omvt_rules", "in0", subnet, [], allowed, resolvers)
        script = f"table inet omvt_rules\ndelete table inet omvt_rules\n{ruleset}"
        subprocess.run(
            ["ip", "netns", "exec", self.router, "nft", "-f", "-"], input=script, text=True, check=True
        )

    def listen(self, address: str, port: int = 0) -> int:
        def make() -> socket.socket:
            listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
            listener.bind((address, port))
            listener.listen(8)
            return listener

        listener = in_netns(self.outer, make)
        self._listeners.append(listener)
        return int(listener.getsockname()[1])

    def connect(self, address: str, port: int) -> str:
        """From `inner`: "connected", or the error's type."""

        def attempt() -> str:
            try:
                socket.create_connection((address, port), timeout=3).close()
                return "connected"
            except OSError as error:
                return type(error).__name__

        return in_netns(self.inner, attempt)

    def __exit__(self, *_: object) -> None:
        for listener in self._listeners:
            listener.close()
        for name in (self.inner, self.router, self.outer):  # their veths go with them
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_the_rules_refuse_private_ipv4_and_ipv6_unless_allowed() -> None:
    private4, ula, other_ula, public6 = (outer for _, outer in _RulesBench.OUTER.values())
    with _RulesBench() as bench:
        ports = {address: bench.listen(address) for address in (private4, ula, other_ula, public6)}
        bench.apply(allowed=())
        # Refused by the private-space rules (a reject: the error comes back at once), not by the
        # catch-all IPv6 drop after them, which would end in a timeout.
        assert bench.connect(private4, ports[private4]) == "OSError"  # EHOSTUNREACH
        assert bench.connect(ula, ports[ula]) == "PermissionError"  # EACCES: ICMPv6 admin-prohibited
        assert bench.connect(other_ula, ports[other_ula]) == "PermissionError"
        # No IPv6 egress otherwise: builds and sandboxes have no IPv6 NAT.
        assert bench.connect(public6, ports[public6]) != "connected"
        bench.apply(allowed=addresses.allowed_networks(["10.99.0.0/24", "fd42:4242::/64"]))
        assert bench.connect(private4, ports[private4]) == "connected"
        assert bench.connect(ula, ports[ula]) == "connected"
        assert bench.connect(other_ula, ports[other_ula]) == "PermissionError"  # exactly the named one
        # A private resolver: its port 53 only.
        bench.listen(private4, 53)
        bench.apply(allowed=(), resolvers=[private4])
        assert bench.connect(private4, 53) == "connected"
        assert bench.connect(private4, ports[private4]) == "OSError"


def test_the_gateway_of_the_build_is_refused_like_any_host_address(
    store: BuildahStore, tmp_path: Path
) -> None:
    """A listener on the host end of the build's own veth (bound once the network exists)."""
    listeners: list[_Listener] = []
    real = container_build.open_build_network

    async def with_listener(policy: EgressPolicy | None = None) -> BuildNetwork:
        network = await real(policy)
        listeners.append(_Listener(network.host_address))
        Path(tmp_path / "context" / "port").write_text(str(listeners[0].port))
        return network

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(container_build, "open_build_network", with_listener)
            results, _ = run_probe(
                store,
                tmp_path,
                'attempt("gateway", lambda: connect(gateway(), int(open("/port").read())))\n',
                extra="COPY port /port\n",
                files={"port": "0"},
            )
    finally:
        reached = [listener.address for listener in listeners if listener.connected()]
        for listener in listeners:
            listener.close()
    assert results["gateway"]["ok"] is False and "ConnectionRefused" in str(results["gateway"]["detail"])
    assert reached == []


def test_a_run_step_gets_a_minimal_dev_of_its_own(store: BuildahStore, tmp_path: Path) -> None:
    """Not the host's /dev: no disks to open (a read-only mount does not protect device nodes),
    none of the host's ptys, and a shared-memory tmpfs of its own."""
    marker = f"omv-test-{uuid.uuid4().hex[:8]}"
    host_shm = Path("/dev/shm") / marker
    host_shm.write_text("host")
    try:
        results, _ = run_probe(
            store,
            tmp_path,
            f"""
            import stat
            def devices():
                found = []
                for top, dirs, files in os.walk("/dev"):
                    for name in files:
                        mode = os.lstat(os.path.join(top, name)).st_mode
                        if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
                            found.append(os.path.join(top, name))
                return sorted(found)
            attempt("devices", devices)
            attempt("host shm", lambda: open("/dev/shm/{marker}").read())
            attempt("write shm", lambda: open("/dev/shm/{marker}-run", "w").write("run"))
            attempt("pty", lambda: os.ttyname(os.openpty()[1]))
            """,
        )
    finally:
        host_shm.unlink()
    devices = json.loads(str(results["devices"]["detail"]).replace("'", '"'))
    expected = [
        "/dev/full",
        "/dev/null",
        "/dev/pts/ptmx",
        "/dev/random",
        "/dev/tty",
        "/dev/urandom",
        "/dev/zero",
    ]
    assert devices == expected, devices
    assert results["host shm"]["ok"] is False and results["write shm"]["ok"] is True, results
    assert not Path(f"/dev/shm/{marker}-run").exists()
    assert results["pty"]["ok"] is True and "/dev/pts/" in str(results["pty"]["detail"]), results


def test_add_cannot_fetch_from_the_hosts_loopback(store: BuildahStore, tmp_path: Path) -> None:
    requests: list[str] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            with connection:
                requests.append(connection.recv(1000).decode(errors="replace"))
                connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nsecret")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    dockerfile = BASE + f"ADD http://127.0.0.1:{port}/secret /secret\nRUN cat /secret\n"
    context = make_context(tmp_path / "context", {"Dockerfile": dockerfile})
    try:
        with pytest.raises(BuildFailed) as caught:
            build(store, context)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert caught.value.code == CONTAINER_BUILD_FAILED
    assert "connection refused" in caught.value.state_reason.lower(), caught.value.state_reason
    assert requests == []
    assert_store_clean(store)


def test_the_chroot_escape_is_refused(store: BuildahStore, tmp_path: Path) -> None:
    target = Path(tempfile.mkdtemp(prefix="omv-escape-")) / "target"
    target.write_text("untouched")
    try:
        results, _ = run_probe(
            store,
            tmp_path,
            f"""
            def escape():
                fd = os.open("/", os.O_RDONLY)
                os.makedirs("/tmp/escape", exist_ok=True)
                os.chroot("/tmp/escape")
                os.fchdir(fd)
                for _ in range(64):
                    os.chdir("..")
                os.chroot(".")
                open({str(target)!r}, "w").write("escaped")
            attempt("escape", escape)
            attempt("capabilities", lambda: [l for l in open("/proc/self/status") if l.startswith("CapBnd")])
            """,
        )
        assert results["escape"]["ok"] is False and "Operation not permitted" in str(results["escape"]), (
            results
        )
        assert target.read_text() == "untouched"
        bounding = int(str(results["capabilities"]["detail"]).split("\\t")[1].split("\\n")[0], 16)
        assert not bounding & (1 << 18), "CAP_SYS_CHROOT is in the RUN step's bounding set"
    finally:
        target.unlink()
        target.parent.rmdir()


def test_every_kind_of_build_end_removes_its_network(
    store: BuildahStore, tmp_path: Path, networks: list[BuildNetwork]
) -> None:
    ok = make_context(tmp_path / "ok" / "context", {"Dockerfile": BASE + "RUN true\n"})
    build(store, ok)
    failing = make_context(tmp_path / "failing" / "context", {"Dockerfile": BASE + "RUN exit 4\n"})
    with pytest.raises(BuildFailed):
        build(store, failing)
    sleeping = make_context(tmp_path / "cancelled" / "context", {"Dockerfile": BASE + "RUN sleep 60\n"})

    async def start_then_cancel() -> None:
        running = asyncio.Event()

        def on_line(line: str) -> None:
            if line.startswith("STEP 2/2"):
                running.set()

        task = asyncio.ensure_future(build_image(store, sleeping, sleeping.parent / "iid", on_line))
        await asyncio.wait_for(running.wait(), 60)
        # buildah itself leaves its working container behind when stopped in the first ~0.1 s of
        # a RUN step (with or without containment); cleanup_build_strays handles that at start.
        await asyncio.sleep(1.0)
        assert _objects_of(networks[-1].names), "the network should exist while the build runs"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(start_then_cancel())
    assert len(networks) == 3
    for network in networks:
        assert _objects_of(network.names) == [], network.names
    assert_store_clean(store)


# A server that opens a build network and dies with it open (os._exit: no cleanup of any kind).
CRASHING_SERVER = """
import asyncio, os
from openmicrovm.builder.build_network import open_build_network
network = asyncio.run(open_build_network())
print(network.names.index, flush=True)
os._exit(0)
"""


def test_leftovers_of_a_crashed_server_are_removed_and_live_networks_kept() -> None:
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_SERVER], check=True, capture_output=True, text=True
    )
    crashed = _Names(int(child.stdout))
    before = _objects_of(crashed)
    assert len(before) == 5, before  # netns, link, table, resolv.conf, lease
    assert crashed.lease_path.read_text().startswith("pid ")  # in the name of the dead server

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        removed = await cleanup_build_networks()
        live = await open_build_network()
        try:
            again = await cleanup_build_networks()
            return removed, again, _objects_of(live.names)
        finally:
            await live.close()

    removed, again, live_objects = asyncio.run(scenario())
    assert crashed.netns in removed and _objects_of(crashed) == []
    assert again == [] and len(live_objects) == 5, "cleanup removed a live build's network"


def test_a_build_subnet_overlapping_a_host_route_is_refused(internet: FakeInternet) -> None:
    overlapping = ipaddress.IPv4Network(f"{internet.host_address}/30", strict=False)
    settings = load_settings(environ={**SETTINGS_ENV, "OPENMICROVM_BUILD_SUBNET": str(overlapping)})
    with pytest.raises(HostNetworkError, match=r"overlaps the host's route .* the setting build_subnet"):
        asyncio.run(open_build_network(policies.for_builds(settings)))


@pytest.mark.parametrize(
    ("host", "upstream", "expected"),
    [
        (
            "nameserver 10.0.0.2\nnameserver ::1\nnameserver 127.0.0.1\nsearch corp\noptions ndots:2\n",
            "",
            ["nameserver 10.0.0.2", "search corp", "options ndots:2"],
        ),
        # systemd-resolved: the stub on the host's loopback is unreachable; its upstreams are used.
        (
            "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n",
            "nameserver 192.168.1.1\nnameserver 2001:db8::1\n",
            ["nameserver 192.168.1.1", "options edns0 trust-ad", "search lan"],
        ),
        ("nameserver 127.0.0.53\n", "", []),
    ],
)
def test_builds_get_the_hosts_reachable_resolvers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, upstream: str, expected: list[str]
) -> None:
    (tmp_path / "host").write_text(host)
    (tmp_path / "upstream").write_text(upstream)
    monkeypatch.setattr(dns, "_HOST_RESOLV_CONF", tmp_path / "host")
    monkeypatch.setattr(dns, "_UPSTREAM_RESOLV_CONF", tmp_path / "upstream")
    text, servers = resolv_conf("an image build")
    assert [line for line in text.splitlines() if not line.startswith("#")] == expected
    assert list(servers) == [line.split()[1] for line in expected if line.startswith("nameserver")]
