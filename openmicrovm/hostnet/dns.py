"""The resolvers a build or a sandbox is given: the host's own, where they can be reached.

The resolv.conf has the host's /etc/resolv.conf IPv4 resolvers (plus search/options). A resolver
on the host itself (127.0.0.53 of systemd-resolved, a local dnsmasq) cannot be reached from a
namespace of ours, so then the upstream resolvers systemd-resolved lists in
/run/systemd/resolve/resolv.conf are used instead; without any, there is no DNS (the caller logs
it). The host's resolvers are often private (a VPC's 10.x.0.2, a home router's 192.168.1.1): the
firewall (firewall.py) keeps exactly those addresses reachable on port 53 (UDP and TCP) and
nothing else of theirs, since a build without DNS cannot install anything, and the host already
trusts them with its own lookups.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

DNS_PORT = 53
_HOST_RESOLV_CONF = Path("/etc/resolv.conf")
_UPSTREAM_RESOLV_CONF = Path("/run/systemd/resolve/resolv.conf")  # systemd-resolved's upstreams


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


def resolv_conf(user: str) -> tuple[str, tuple[str, ...]]:
    """The resolv.conf `user` (words: "an image build", "a MicroVM") gets, and its nameservers
    (empty: it has no DNS)."""
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
