"""What the host must allow before builds or sandboxes get egress: forwarding, a free subnet."""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import shutil
from pathlib import Path

from .commands import run_command
from .errors import HostNetworkError

logger = logging.getLogger("openmicrovm.hostnet")

_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def ensure_forwarding(purpose: str) -> None:
    """IPv4 forwarding on (switched on when off, as Docker and Podman do): purpose needs it."""
    try:
        if _IP_FORWARD.read_text().strip() == "1":
            return
        _IP_FORWARD.write_text("1\n")
    except OSError as error:
        raise HostNetworkError(
            f"cannot enable IPv4 forwarding for the egress of {purpose}: {error}"
        ) from None
    logger.warning("enabled IPv4 forwarding (net.ipv4.ip_forward=1) so that %s reach the network", purpose)


_forwarding_checked: set[str] = set()  # link prefixes warned about


async def warn_if_forwarding_is_filtered(link_prefix: str, purpose: str) -> None:
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


async def check_no_overlap(subnet: ipaddress.IPv4Network, setting: str, own_links: re.Pattern[str]) -> None:
    """Refuse a subnet (the setting `setting`) that overlaps a network the host routes elsewhere
    than own_links."""
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
            raise HostNetworkError(
                f"the subnet {subnet} overlaps the host's route to {dst} (dev {dev}); "
                f"choose another private range with the setting {setting} (env OPENMICROVM_{setting.upper()})"
            )
