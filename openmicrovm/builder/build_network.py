"""The network a build runs in: its own namespace with egress to the outside world only.

Every `buildah bud` runs in a network namespace of its own (see isolation.py for the rest of its
containment), wired to the host like this:

    [build netns omvb-XXXX]  eth0 10.213.a.b+2/30  <--veth-->  omvbXXXXh 10.213.a.b+1/30  [host]
    default route via the host end                             NAT (masquerade) to the world

and an nftables table `inet omvb_XXXX` of its own, which

* refuses everything from the build addressed to the host itself (the input hook sees every packet
  for any address of this machine: loopback, every interface, 0.0.0.0 listeners, the veth's own
  address), so the API, moto, a DNS stub or any other host service is out of reach;
* refuses forwarded traffic the host DNATs (published container ports are the host's too), traffic
  to link-local 169.254.0.0/16 and fe80::/10 (the sandboxes' addresses and cloud metadata
  services), loopback, multicast and reserved ranges, traffic to other builds and to MicroVMs'
  uplinks (runtime/egress.py, which gives MicroVMs with internet egress the same table,
  egress_ruleset), and whatever OPENMICROVM_BUILD_EGRESS_DENY lists (comma-separated IPv4
  networks);
* refuses private and shared address space (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7: the
  operator's LAN, VPC, VPN, other containers), except the networks the settings allow
  (egress_allow_networks) and DNS (port 53 only) to the resolvers the build is given. The rules
  above come first, so neither exception ever re-opens the host, loopback, link-local addresses,
  other builds or sandboxes, or an operator's explicit denial;
* drops all other IPv6: builds and sandboxes have none today (no IPv6 address or route on their
  links, see _create and runtime/egress.py; the input chain even refuses their neighbour
  discovery), and there is no IPv6 NAT. The IPv6 rules above are still written out, so that
  fc00::/7 stays refused should they ever get IPv6;
* lets everything else out, masqueraded behind the host's address on the way out, and lets only
  replies back in.

TCP is refused with a reset and the rest with ICMP admin-prohibited, so a build that tries fails at
once instead of hanging in connect. Inside, 127.0.0.1 is the namespace's own loopback: `ADD
http://127.0.0.1:<port>/` and a RUN step's `curl localhost` never reach the host.

DNS: the build gets the host's /etc/resolv.conf with its IPv4 resolvers (plus search/options).
A resolver on the host itself (127.0.0.53 of systemd-resolved, a local dnsmasq) cannot be reached
from the build, so then the upstream resolvers systemd-resolved lists in
/run/systemd/resolve/resolv.conf are used instead; without any, the build has no DNS (logged).
The host's resolvers are often private (a VPC's 10.x.0.2, a home router's 192.168.1.1): exactly
those addresses stay reachable on port 53 (UDP and TCP) and nothing else of theirs, since a build
without DNS cannot install anything, and the host already trusts them with its own lookups.

Addresses: one /30 per build from OPENMICROVM_BUILD_SUBNET (default 10.213.0.0/16, 16384 builds
at once; the lowest free one is taken; a subnet overlapping a route of the host is refused). A /30
is reserved host-wide by an flock on /run/openmicrovm/build-net/XXXX.lock, held for the build's
life and unlinked after, so several servers on one machine never collide, and the lock tells a
live build from one a crashed server left behind: cleanup_build_networks() removes every omvb-*
namespace, omvb*h veth, omvb_* table and resolver file whose lock is free, and is safe to call at
any time (it also runs before each build).

Needs root, iproute2 and nftables (the `nft` command), and IPv4 forwarding: it is switched on when
off (as Docker and Podman do), since builds may need egress.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from openmicrovm.builder.cleanup import run_to_completion

logger = logging.getLogger(__name__)

DEFAULT_SUBNET = "10.213.0.0/16"
SUBNET_ENV = "OPENMICROVM_BUILD_SUBNET"
# More destinations to refuse builds, comma-separated IPv4 networks (e.g. the LAN's private ranges).
EGRESS_DENY_ENV = "OPENMICROVM_BUILD_EGRESS_DENY"
STATE_DIR = Path("/run/openmicrovm/build-net")
NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "omvb-"  # the runtime's sandboxes use omv-<scope>-...; no overlap
LINK_PREFIX = "omvb"
TABLE_PREFIX = "omvb_"
_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
_HOST_RESOLV_CONF = Path("/etc/resolv.conf")
_UPSTREAM_RESOLV_CONF = Path("/run/systemd/resolve/resolv.conf")  # systemd-resolved's upstreams
# Never forwarded from a build, whatever the settings allow: link-local (sandboxes, cloud
# metadata), loopback, "this network", multicast and reserved space; in IPv6 the same, plus
# IPv4-mapped addresses (another spelling of IPv4 destinations).
_BLOCKED_DESTINATIONS = "169.254.0.0/16, 127.0.0.0/8, 0.0.0.0/8, 224.0.0.0/4, 240.0.0.0/4"
_BLOCKED_DESTINATIONS_V6 = "::/128, ::1/128, ::ffff:0:0/96, fe80::/10, ff00::/8"
# Private and shared address space (RFC 1918, RFC 6598 carrier-grade NAT, RFC 4193 unique local):
# the operator's LAN, VPC, VPN or other containers, refused unless the settings allow a network.
PRIVATE_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
ALLOW_SETTING = "egress_allow_networks"
DNS_PORT = 53

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NETNS_NAME = re.compile(rf"^{NETNS_PREFIX}([0-9a-f]{{4}})$")
_LINK_NAME = re.compile(rf"^{LINK_PREFIX}([0-9a-f]{{4}})h$")
_TABLE_NAME = re.compile(rf"^{TABLE_PREFIX}([0-9a-f]{{4}})$")
_STATE_FILE = re.compile(r"^([0-9a-f]{4})\.(?:resolv\.conf|lock)$")


class BuildNetworkError(Exception):
    """The build network could not be set up (the build must not run without it)."""


class EgressSettingError(ValueError):
    """The setting egress_allow_networks names something the firewall cannot open."""


@dataclass(frozen=True)
class _Names:
    index: int

    @property
    def tag(self) -> str:
        return f"{self.index:04x}"

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.tag}"

    @property
    def host_link(self) -> str:
        return f"{LINK_PREFIX}{self.tag}h"

    @property
    def table(self) -> str:
        return f"{TABLE_PREFIX}{self.tag}"

    @property
    def lock_path(self) -> Path:
        return STATE_DIR / f"{self.tag}.lock"

    @property
    def resolv_conf(self) -> Path:
        return STATE_DIR / f"{self.tag}.resolv.conf"


@dataclass(frozen=True)
class BuildNetwork:
    """A build's network namespace, alive until close()."""

    names: _Names
    subnet: ipaddress.IPv4Network  # the build's /30
    nameservers: tuple[str, ...]
    _lock: int  # file descriptor holding the flock

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.names.netns

    @property
    def resolv_conf(self) -> Path:
        return self.names.resolv_conf

    @property
    def build_address(self) -> str:
        return str(self.subnet.network_address + 2)

    @property
    def host_address(self) -> str:
        return str(self.subnet.network_address + 1)

    async def close(self) -> None:
        """Remove the namespace, veth, nftables table and resolver file, then free the /30."""
        try:
            await _remove_objects(self.names)
        finally:
            _release(self.names, self._lock)


def configured_subnet(env: str = SUBNET_ENV, default: str = DEFAULT_SUBNET) -> ipaddress.IPv4Network:
    text = os.environ.get(env, "").strip() or default
    try:
        subnet = ipaddress.IPv4Network(text)
    except ValueError as error:
        raise BuildNetworkError(f"${env}={text!r} is not an IPv4 network: {error}") from None
    if subnet.prefixlen > 30 or not subnet.is_private:
        raise BuildNetworkError(f"${env}={text!r} must be a private IPv4 network of /30 or larger")
    return subnet


def configured_denials(env: str = EGRESS_DENY_ENV) -> list[ipaddress.IPv4Network]:
    text = os.environ.get(env, "")
    try:
        return [ipaddress.IPv4Network(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise BuildNetworkError(f"${env}={text!r}: {error}") from None


def allowed_networks(entries: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    """The setting egress_allow_networks as networks. Raises EgressSettingError for an entry that is
    not a network, or that names only addresses builds and MicroVMs never reach (the firewall would
    silently keep them closed, which an operator who listed them would not expect)."""
    networks: list[IPNetwork] = []
    for entry in entries:
        text = str(entry).strip()
        try:
            network = ipaddress.ip_network(text)
        except ValueError as error:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f"; did you mean {ipaddress.ip_network(text, strict=False)}?"
            raise EgressSettingError(
                f"setting {ALLOW_SETTING}: {text!r} is not an IPv4 or IPv6 network in CIDR form "
                f"(e.g. 192.168.1.0/24): {error}{hint}"
            ) from None
        kinds = {
            "loopback": network.is_loopback,
            "link-local (cloud metadata, sandbox addresses)": network.is_link_local,
            "multicast": network.is_multicast,
            "reserved": network.is_reserved or network.is_unspecified,
        }
        never = next((kind for kind, matches in kinds.items() if matches), None)
        if never is not None:
            raise EgressSettingError(
                f"setting {ALLOW_SETTING}: {text} is {never} address space, which MicroVMs and "
                "builds can never reach; remove it"
            )
        networks.append(network)
    return tuple(networks)


def _slot(subnet: ipaddress.IPv4Network, index: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((int(subnet.network_address) + 4 * index, 30))


def _slots(subnet: ipaddress.IPv4Network) -> int:
    return min(subnet.num_addresses // 4, 0x10000)


# ----------------------------------------------------------------------------- subprocesses


async def run_command(argv: list[str], stdin: str | None = None, check: bool = True) -> tuple[int, str]:
    """Run a command; returns (returncode, combined output). Raises BuildNetworkError if `check`."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except FileNotFoundError:
        package = "nftables" if argv[0] == "nft" else "iproute2"
        raise BuildNetworkError(
            f"`{argv[0]}` is not installed on this server (Debian: apt-get install {package})"
        ) from None
    output, _ = await process.communicate(stdin.encode() if stdin is not None else None)
    text = output.decode(errors="replace").strip()
    assert process.returncode is not None
    if check and process.returncode != 0:
        shown = " ".join(argv) + (f" <<< {stdin.strip()!r}" if stdin else "")
        raise BuildNetworkError(f"{shown} failed: {text}")
    return process.returncode, text


async def _ip_batch(netns: str | None, commands: list[str]) -> None:
    await run_command(["ip", *(["-n", netns] if netns else []), "-batch", "-"], "\n".join(commands) + "\n")


# ----------------------------------------------------------------------------- DNS


def _resolver_lines(text: str) -> tuple[list[str], list[str]]:
    """(usable IPv4 nameservers, search/domain/options lines) of a resolv.conf."""
    servers: list[str] = []
    others: list[str] = []
    for raw in text.splitlines():
        fields = raw.split("#", 1)[0].split(";", 1)[0].split()
        if not fields:
            continue
        if fields[0] == "nameserver" and len(fields) >= 2:
            try:
                address = ipaddress.ip_address(fields[1])
            except ValueError:
                continue
            # A resolver on this host is out of the build's reach; the build has no IPv6.
            if address.version == 4 and not (address.is_loopback or address.is_unspecified):
                servers.append(str(address))
        elif fields[0] in ("search", "domain", "options"):
            others.append(" ".join(fields))
    return servers, others


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def build_resolv_conf(user: str = "an image build") -> tuple[str, tuple[str, ...]]:
    """The resolv.conf a build (or another `user` of the host's resolvers) gets, and its
    nameservers (empty: it has no DNS)."""
    servers, others = _resolver_lines(_read(_HOST_RESOLV_CONF))
    if not servers:
        upstream, upstream_others = _resolver_lines(_read(_UPSTREAM_RESOLV_CONF))
        servers, others = upstream, others or upstream_others
    servers = list(dict.fromkeys(servers))[:3]  # glibc uses at most three
    lines = [
        f"# written by openmicrovm for {user} (the host's resolvers)",
        *(f"nameserver {server}" for server in servers),
        *others,
    ]
    return "\n".join(lines) + "\n", tuple(servers)


# ----------------------------------------------------------------------------- firewall


# Links whose traffic is contained like a build's: builds (omvb...h) and sandbox uplinks
# (omvs...h, runtime/egress.py). Nothing from one of them may reach another.
ISOLATED_LINK_GLOBS = ("omvb*", "omvs*")


_FAMILIES = {4: "ip", 6: "ip6"}  # nft's keyword for each IP version


def _family(network: IPNetwork) -> str:
    return _FAMILIES[network.version]


def _interval_sets(networks: Iterable[IPNetwork]) -> list[tuple[str, str]]:
    """(nft family keyword, set body) per address family, overlaps merged: overlapping networks in
    one interval set are an nft error."""
    listed = list(networks)
    sets = []
    for version, family in _FAMILIES.items():
        merged = ipaddress.collapse_addresses(n for n in listed if n.version == version)
        text = ", ".join(str(network) for network in merged)
        if text:
            sets.append((family, text))
    return sets


def egress_ruleset(
    table: str,
    link: str,
    subnet: ipaddress.IPv4Network,
    denied: Sequence[IPNetwork],
    allowed: Sequence[IPNetwork] = (),
    resolvers: Sequence[str] = (),
) -> str:
    """The host's nftables table for one contained link (see the module docstring): `subnet` is the
    link's /30, whose traffic is masqueraded on its way out; `allowed` the private networks it may
    reach (egress_allow_networks); `resolvers` the nameservers it was given, reachable on port 53
    even when private. Order matters: every refusal that nothing may re-open comes before the
    accepts, and the default refusal of private space after them."""
    refuse = "reject with icmpx type admin-prohibited"
    on_link = f'        iifname "{link}"'
    # One rule per operator denial: overlapping networks in one interval set are an nft error.
    denials = "".join(f"{on_link} {_family(network)} daddr {network} {refuse}\n" for network in denied)
    isolation = "".join(f'{on_link} oifname "{glob}" {refuse}\n' for glob in ISOLATED_LINK_GLOBS)
    dns = "".join(
        f"{on_link} {_family(ipaddress.ip_network(server))} daddr {server} "
        f"meta l4proto {{ tcp, udp }} th dport {DNS_PORT} accept\n"
        for server in dict.fromkeys(resolvers)
    )
    openings = "".join(
        f"{on_link} {family} daddr {{ {body} }} accept\n" for family, body in _interval_sets(allowed)
    )
    private = "".join(
        f"{on_link} {family} daddr {{ {body} }} {refuse}\n"
        for family, body in _interval_sets(ipaddress.ip_network(n) for n in PRIVATE_NETWORKS)
    )
    return f"""\
table inet {table} {{
    chain input {{
        type filter hook input priority filter - 5; policy accept;
        iifname "{link}" meta l4proto tcp reject with tcp reset
        iifname "{link}" {refuse}
    }}
    chain forward {{
        type filter hook forward priority filter - 5; policy accept;
        iifname "{link}" ct status dnat {refuse}
        iifname "{link}" ip daddr {{ {_BLOCKED_DESTINATIONS} }} {refuse}
        iifname "{link}" ip6 daddr {{ {_BLOCKED_DESTINATIONS_V6} }} {refuse}
{isolation}{denials}{dns}{openings}{private}        iifname "{link}" meta nfproto ipv6 drop
        oifname "{link}" ct state established,related accept
        oifname "{link}" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} oifname != "{link}" masquerade
    }}
}}
"""


async def table_names() -> list[str]:
    if shutil.which("nft") is None:
        return []
    code, output = await run_command(["nft", "-j", "list", "tables", "inet"], check=False)
    if code != 0:
        return []
    try:
        listed = json.loads(output or "{}").get("nftables", [])
    except ValueError:
        return []
    return [item["table"]["name"] for item in listed if isinstance(item, dict) and "table" in item]


# ----------------------------------------------------------------------------- host checks


def ensure_forwarding(purpose: str = "image builds") -> None:
    try:
        if _IP_FORWARD.read_text().strip() == "1":
            return
        _IP_FORWARD.write_text("1\n")
    except OSError as error:
        raise BuildNetworkError(
            f"cannot enable IPv4 forwarding for the egress of {purpose}: {error}"
        ) from None
    logger.warning("enabled IPv4 forwarding (net.ipv4.ip_forward=1) so that %s reach the network", purpose)


_forwarding_checked: set[str] = set()  # link prefixes warned about


async def warn_if_forwarding_is_filtered(
    link_prefix: str = LINK_PREFIX, purpose: str = "image builds"
) -> None:
    """Once per process and prefix: an iptables FORWARD policy of DROP (Docker sets one) drops the
    forwarded traffic of our links whatever our table accepts, so they would have no egress."""
    if link_prefix in _forwarding_checked or shutil.which("iptables") is None:
        return
    _forwarding_checked.add(link_prefix)
    code, output = await run_command(["iptables", "-S", "FORWARD"], check=False)
    if code == 0 and "-P FORWARD DROP" in output.splitlines():
        logger.warning(
            "the iptables FORWARD policy is DROP: %s will have no network egress unless "
            "forwarding is allowed for them, e.g. iptables -I FORWARD -i %s+ -j ACCEPT and "
            "iptables -I FORWARD -o %s+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            purpose,
            link_prefix,
            link_prefix,
        )


async def check_no_overlap(
    subnet: ipaddress.IPv4Network, env: str = SUBNET_ENV, own_links: re.Pattern[str] = _LINK_NAME
) -> None:
    """Refuse a subnet (of $env) that overlaps a network the host routes elsewhere than own_links."""
    code, output = await run_command(["ip", "-j", "-4", "route", "show", "table", "all"], check=False)
    if code != 0:
        return
    try:
        routes = json.loads(output or "[]")
    except ValueError:
        return
    for route in routes:
        dst, dev = route.get("dst", ""), str(route.get("dev", ""))
        if dst in ("", "default") or own_links.match(dev) or route.get("type") in ("local", "broadcast"):
            continue
        try:
            network = ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False)
        except ValueError:
            continue
        if network.prefixlen > 0 and network.overlaps(subnet):
            raise BuildNetworkError(
                f"the subnet {subnet} overlaps the host's route to {dst} (dev {dev}); "
                f"choose another private range with ${env}"
            )


# ----------------------------------------------------------------------------- locks and cleanup


def _try_lock(names: _Names) -> int | None:
    """The flock'd fd of the slot, or None when a live build holds it. Lock files are unlinked by
    their holder on release (`_release`), so a lock taken on a file that was unlinked meanwhile is
    worthless: the inode check retries on the new file."""
    STATE_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    while True:
        fd = os.open(names.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            current = os.stat(names.lock_path)
        except (BlockingIOError, FileNotFoundError) as error:
            os.close(fd)
            if isinstance(error, BlockingIOError):
                return None
            continue
        except BaseException:
            os.close(fd)
            raise
        if os.fstat(fd).st_ino == current.st_ino:
            return fd
        os.close(fd)


def _release(names: _Names, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        names.lock_path.unlink()
    os.close(fd)


async def _remove_objects(names: _Names, tables: list[str] | None = None) -> None:
    """Remove what exists of a slot's objects; quiet about what does not."""
    # Deleting the host end removes the pair; the namespace goes when its last process does.
    if Path("/sys/class/net", names.host_link).exists():
        await run_command(["ip", "link", "delete", names.host_link], check=False)
    if (NETNS_DIR / names.netns).exists():
        await run_command(["ip", "netns", "delete", names.netns], check=False)
    if names.table in (tables if tables is not None else await table_names()):
        await run_command(["nft", "delete", "table", "inet", names.table], check=False)
    names.resolv_conf.unlink(missing_ok=True)


async def _leftover_indexes() -> set[int]:
    found: set[int] = set()

    def collect(pattern: re.Pattern[str], entries: list[str]) -> None:
        for entry in entries:
            if match := pattern.match(entry):
                found.add(int(match.group(1), 16))

    with contextlib.suppress(OSError):
        collect(_NETNS_NAME, os.listdir(NETNS_DIR))
    with contextlib.suppress(OSError):
        collect(_LINK_NAME, os.listdir("/sys/class/net"))
    with contextlib.suppress(OSError):
        collect(_STATE_FILE, os.listdir(STATE_DIR))
    collect(_TABLE_NAME, await table_names())
    return found


async def cleanup_build_networks() -> list[str]:
    """Remove the build networks (namespace, veth, nftables table, resolver and lock files) that no
    running build holds: what a crashed or killed server left behind. Safe at any time, also while
    builds of this or another server run (their flocks keep them). Returns the namespaces removed.
    Failures are logged, not raised: call it at server start."""
    removed: list[str] = []
    if os.geteuid() != 0:
        return removed  # nothing of ours can exist: creating it needs root
    indexes = await _leftover_indexes()
    if not indexes:
        return removed
    tables = await table_names()
    for index in sorted(indexes):
        names = _Names(index)
        try:
            fd = _try_lock(names)  # non-blocking; in the loop's thread so a cancel cannot lose the fd
            if fd is None:
                continue  # a live build
            try:
                await _remove_objects(names, tables)
                removed.append(names.netns)
            finally:
                _release(names, fd)
        except (BuildNetworkError, OSError):
            logger.exception("could not remove the leftover build network %s", names.netns)
    if removed:
        logger.info("removed %d build network(s) left behind: %s", len(removed), ", ".join(removed))
    return removed


# ----------------------------------------------------------------------------- setup


async def _create(
    names: _Names,
    subnet: ipaddress.IPv4Network,
    denied: Sequence[IPNetwork],
    allowed: Sequence[IPNetwork],
    resolvers: Sequence[str],
) -> None:
    host = f"{subnet.network_address + 1}/30"
    build = f"{subnet.network_address + 2}/30"
    await _ip_batch(
        None,
        [
            f"netns add {names.netns}",
            f"link add {names.host_link} type veth peer name eth0 netns {names.netns}",
            # No IPv6 link-local addresses: the build has IPv4 only (and resolvers skip AAAA).
            f"link set {names.host_link} addrgenmode none",
            f"addr add {host} dev {names.host_link}",
            f"link set {names.host_link} up",
        ],
    )
    await _ip_batch(
        names.netns,
        [
            "link set lo up",
            "link set eth0 addrgenmode none",
            f"addr add {build} dev eth0",
            "link set eth0 up",
            f"route add default via {subnet.network_address + 1}",
        ],
    )
    ruleset = egress_ruleset(names.table, names.host_link, subnet, denied, allowed, resolvers)
    await run_command(["nft", "-f", "-"], ruleset)


async def open_build_network(allowed: Sequence[IPNetwork] = ()) -> BuildNetwork:
    """A fresh build network; close() it when the build is over (also on failure/cancellation).
    allowed: the private networks the build may reach (the setting egress_allow_networks, see
    allowed_networks); none by default."""
    if os.geteuid() != 0:
        raise BuildNetworkError("image builds run in a network namespace of their own, which needs root")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            raise BuildNetworkError(
                f"`{tool}` is not installed on this server (Debian: apt-get install {package})"
            )
    subnet = configured_subnet()
    denied = configured_denials()
    await check_no_overlap(subnet)
    await warn_if_forwarding_is_filtered()
    await asyncio.to_thread(ensure_forwarding)
    await cleanup_build_networks()
    for index in range(_slots(subnet)):  # the lowest free slot: few lock files, few addresses
        names = _Names(index)
        fd = _try_lock(names)  # non-blocking; in the loop's thread so a cancel cannot lose the fd
        if fd is None:
            continue
        try:
            await _remove_objects(names)  # a crash between lock and cleanup may have left some
            text, servers = build_resolv_conf()
            names.resolv_conf.write_text(text)
            await _create(names, _slot(subnet, names.index), denied, allowed, servers)
        except BaseException:
            try:
                await run_to_completion(_remove_objects(names))
            finally:
                _release(names, fd)
            raise
        return BuildNetwork(names, _slot(subnet, names.index), servers, fd)
    raise BuildNetworkError(f"all {_slots(subnet)} build subnets of {subnet} are in use")
