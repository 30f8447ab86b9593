"""How image files are owned on the host: container id N is stored as host id ID_BASE + N.

Dockerfile builds run in a user namespace that maps container ids 0..ID_COUNT-1 to host ids
ID_BASE..ID_BASE+ID_COUNT-1 (builder/build_jail.py), so container root is never host root: a file
a build writes is owned by an unprivileged host id, a setuid bit in a layer makes nothing run as
host root, and file capabilities written in the namespace apply only inside it. The image root
filesystems a build exports keep that ownership; each sandbox driver shows them to the app with
the ids shifted back (SandboxSpec.rootfs_id_base).

ID_BASE is far above the ranges Debian's adduser hands out in /etc/subuid (100000 upwards, 65536
per user), so no host user's rootless containers share these ids.
"""

from __future__ import annotations

ID_BASE = 2_000_000_000
ID_COUNT = 65536
MAX_ID = 2**32 - 2  # the highest uid/gid: (uid_t)-1 is no id


def uid_map_line(base: int = ID_BASE, count: int = ID_COUNT) -> str:
    """The /proc/<pid>/uid_map (and gid_map) line that makes container id 0 host id `base`."""
    return f"0 {base} {count}\n"


def id_base_problem(base: int) -> str | None:
    """Why `base` cannot start a range of ID_COUNT host ids, or None when it can."""
    if 0 <= base <= MAX_ID + 1 - ID_COUNT:
        return None
    return f"rootfs_id_base {base} does not start a range of {ID_COUNT} host ids"
