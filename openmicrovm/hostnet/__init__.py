"""The host's side of networking, shared by image builds (builder/build_network.py) and sandboxes
(runtime/egress.py, runtime/netns.py):

    addresses    subnets and /30 slots, an egress policy (the operator's denials and allowances)
    policies     the egress policies the settings give builds and MicroVMs
    slots        how a slot's host objects are named, and how it is leased (one protocol for both)
    dns          the resolvers a build or a sandbox is given
    firewall     the nftables table of one contained link
    host_checks  forwarding on, nothing filtering it, a subnet the host does not route elsewhere
    commands     ip / nft / iptables, with their output in errors
    errors       HostNetworkError, EgressSettingError

Nothing here knows about builds, sandboxes or the API.
"""
