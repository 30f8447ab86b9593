"""Which Host headers name this server.

A web page can point a name it controls at 127.0.0.1 (DNS rebinding): the browser then sends the
page's requests, and lets it read the answers, as if this server were the page's own origin. The
only thing that tells such a request apart is its Host, which still names the attacker's
domain, so the API answers only Hosts that name this server: the loopback names, the configured
`host`, and the names in the `allowed_hosts` setting, on any port.
"""

from __future__ import annotations

import ipaddress
import logging
import re

from openmicrovm.config import Settings

log = logging.getLogger("openmicrovm.api.hosts")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# Addresses that mean "every interface" when bound to: they name no server, so a Host saying
# them is not taken as naming this one (a server bound to all interfaces lists its real names in
# allowed_hosts).
_WILDCARDS = frozenset({"0.0.0.0", "[::]"})
_HOST = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[a-z0-9_-]+(?:\.[a-z0-9_-]+)*)\.?(?::(?P<port>[0-9]{1,5}))?")


def host_name(value: str) -> str | None:
    """The name a Host value (`name[:port]`, `[ipv6][:port]`) gives, lowercased, without its port
    or trailing dot; IPv6 addresses in their compressed form. None when the value is not a Host."""
    match = _HOST.fullmatch(value.strip().lower())
    if match is None:
        return None
    name = match["name"]
    if name.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(name[1:-1]).compressed}]"
        except ValueError:
            return None
    return name


def _setting_name(entry: str) -> str | None:
    """A name from the settings, where an IPv6 address may be written without brackets."""
    entry = entry.strip()
    if entry.count(":") > 1 and not entry.startswith("["):
        entry = f"[{entry}]"
    return host_name(entry)


class HostPolicy:
    """The names this server answers to, read once from the settings."""

    def __init__(self, settings: Settings) -> None:
        names = set(LOOPBACK_NAMES)
        for entry in (settings.host, *settings.allowed_hosts):
            name = _setting_name(entry)
            if name is None:
                log.warning(
                    "ignoring %r: it is not a host name (allowed_hosts takes names, no scheme)", entry
                )
            elif name not in _WILDCARDS:
                names.add(name)
        self.names = frozenset(names)

    def allows(self, host: str) -> bool:
        return host_name(host) in self.names

    def describe(self) -> str:
        """The names, for messages: loopback names first, then the configured ones."""
        extra = sorted(self.names - set(LOOPBACK_NAMES))
        return ", ".join([*LOOPBACK_NAMES, *extra])
