"""The host's nftables table for one contained link (a build's veth, a sandbox's uplink).

The table (egress_ruleset):

* refuses everything from the link addressed to the host itself (the input hook sees every packet
  for any address of this machine: loopback, every interface, 0.0.0.0 listeners, the veth's own
  address), so the API, moto, a DNS stub or any other host service is out of reach;
* refuses forwarded traffic the host DNATs (published container ports are the host's too), traffic
  to link-local 169.254.0.0/16 and fe80::/10 (the sandboxes' addresses and cloud metadata
  services), loopback, multicast and reserved ranges, traffic to other builds and to MicroVMs'
  uplinks (runtime/egress.py), and whatever the operator denies (EgressPolicy.denied);
* refuses private and shared address space (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7: the
  operator's LAN, VPC, VPN, other containers), except the networks the settings allow
  (egress_allow_networks) and DNS (port 53 only) to the resolvers the link is given (dns.py). The rules
  above come first, so neither exception ever re-opens the host, loopback, link-local addresses,
  other builds or sandboxes, or an operator's explicit denial;
* drops all other IPv6: builds and sandboxes have none today (no IPv6 address or route on their
  links, see builder/build_network.py and runtime/egress.py; the input chain even refuses
  their neighbour discovery), and there is no IPv6 NAT. The IPv6 rules above are still written out, so that
  fc00::/7 stays refused should they ever get IPv6;
* lets everything else out, masqueraded behind the host's address on the way out, and lets only
  replies back in.

TCP is refused with a reset and the rest with ICMP admin-prohibited, so whatever tries fails at
once instead of hanging in connect. Inside, 127.0.0.1 is the namespace's own loopback: `ADD
http://127.0.0.1:<port>/` and a RUN step's `curl localhost` never reach the host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import shutil
from collections.abc import Iterable, Sequence

from . import nft_tables
from .addresses import PRIVATE_NETWORKS, IPNetwork
from .commands import run_command
from .dns import DNS_PORT

log = logging.getLogger("openmicrovm.hostnet")
# Never forwarded from a contained link, whatever the settings allow: link-local (sandboxes, cloud
# metadata), loopback, "this network", multicast and reserved space; in IPv6 the same, plus
# IPv4-mapped addresses (another spelling of IPv4 destinations).
_BLOCKED_DESTINATIONS = "169.254.0.0/16, 127.0.0.0/8, 0.0.0.0/8, 224.0.0.0/4, 240.0.0.0/4"
_BLOCKED_DESTINATIONS_V6 = "::/128, ::1/128, ::ffff:0:0/96, fe80::/10, ff00::/8"

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
    """The host's inet tables: from the kernel (nft_tables.py), else from `nft`, which is slow."""
    try:
        return await asyncio.to_thread(nft_tables.table_names)
    except OSError as error:
        log.debug("listing nftables tables over netlink failed (%s); asking nft", error)
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
