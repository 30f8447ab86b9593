"""Address space: the private subnets builds and sandboxes take /30 slots from, the operator's
denials and allowances, and the slots themselves (one /30 each: .1 the host's end, .2 the far end)."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import EgressSettingError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Private and shared address space (RFC 1918, RFC 6598 carrier-grade NAT, RFC 4193 unique local):
# the operator's LAN, VPC, VPN or other containers, refused unless the settings allow a network.
PRIVATE_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
ALLOW_SETTING = "egress_allow_networks"


@dataclass(frozen=True)
class EgressPolicy:
    """Where one kind of contained link (image builds, MicroVM uplinks) takes its /30 slots, and
    what the firewall refuses and opens for it beyond its fixed rules (firewall.py)."""

    # The private IPv4 network the /30 slots come from.
    subnet: ipaddress.IPv4Network
    # The setting that chose it, named when the host routes it elsewhere.
    subnet_setting: str
    # The operator's denials: refused whatever the rest allows.
    denied: tuple[ipaddress.IPv4Network, ...] = ()
    # Private networks opened although private space is refused (egress_allow_networks).
    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(
        cls,
        subnet: str,
        subnet_setting: str,
        denied: Iterable[str] = (),
        denied_setting: str = "",
        allowed: Iterable[str | IPNetwork] = (),
    ) -> EgressPolicy:
        """From settings' text; EgressSettingError naming the setting for anything invalid."""
        return cls(
            _subnet(subnet, subnet_setting),
            subnet_setting,
            _denials(denied, denied_setting),
            allowed_networks(allowed),
        )


def _subnet(text: str, setting: str) -> ipaddress.IPv4Network:
    """A private IPv4 network with room for at least one /30."""
    try:
        subnet = ipaddress.IPv4Network(text.strip())
    except ValueError as error:
        raise EgressSettingError(f"setting {setting}: {text!r} is not an IPv4 network: {error}") from None
    if subnet.prefixlen > 30 or not subnet.is_private:
        raise EgressSettingError(
            f"setting {setting}: {text!r} must be a private IPv4 network of /30 or larger"
        )
    return subnet


def _denials(entries: Iterable[str], setting: str) -> tuple[ipaddress.IPv4Network, ...]:
    """IPv4 networks nothing of ours may reach, each once."""
    networks: list[ipaddress.IPv4Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.IPv4Network(entry.strip()))
        except ValueError as error:
            raise EgressSettingError(f"setting {setting}: {entry!r}: {error}") from None
    return tuple(dict.fromkeys(networks))


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


def slot(subnet: ipaddress.IPv4Network, index: int) -> ipaddress.IPv4Network:
    """The /30 of slot `index` in subnet."""
    return ipaddress.IPv4Network((int(subnet.network_address) + 4 * index, 30))


def slot_count(subnet: ipaddress.IPv4Network) -> int:
    """How many slots subnet holds (at most 65536: names carry a slot in four hex digits)."""
    return min(subnet.num_addresses // 4, 0x10000)
