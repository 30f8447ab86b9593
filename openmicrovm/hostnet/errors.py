"""What goes wrong with the host's network objects."""


class HostNetworkError(Exception):
    """A namespace, link, route or nftables table could not be made, changed or inspected; the
    message names the command and what it printed (nothing that needs it may run without it)."""


class EgressSettingError(ValueError):
    """The setting egress_allow_networks names something the firewall cannot open."""
