"""Many hosts: host agents that run builds and sandboxes, and the replicas that dispatch to them.

A host agent (agent.py) registers its host in the database, holds a lease by heartbeat and stops
its own sandboxes when it cannot renew it (fencing); it takes builds, and acts on the MicroVMs
placed on it when woken (PostgreSQL NOTIFY) or when it sweeps. A replica (dispatch.py) places new
MicroVMs (placement.py), wakes the owning agent, relays endpoint traffic to it (relay_*.py), and,
one replica at a time by lease, runs the timers and ends the work of lost hosts (watch.py).
"""
