"""Trees like a version's outputs, with every kind of entry a root filesystem may hold, and a
description of a tree precise enough to compare two of them entry by entry."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import struct
from pathlib import Path
from typing import Any

from openmicrovm.runtime.driver import ProcessConfig, SandboxSpec
from openmicrovm.runtime.gvisor.records import GVisorSnapshotMeta
from openmicrovm.runtime.records import SNAPSHOT_FILE, write_private

ID = 100000  # like a shifted container id range: container id N is host id ID + N
MIB = 1024 * 1024
# A v2 file capability (VFS_CAP_REVISION_2): cap_net_raw (bit 13) permitted and effective.
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
# The same written inside a user namespace whose root is host id ID (VFS_CAP_REVISION_3, rootid).
CAP_NET_RAW_IN_NAMESPACE = struct.pack("<IIIIII", 0x03000001, 1 << 13, 0, 0, 0, ID)


def _file(path: Path, data: bytes, mode: int = 0o644, owner: int = 0, mtime: int = 1_700_000_000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, ID + owner, ID + owner)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime * 10**9 + 123, mtime * 10**9 + 123))
    return path


def make_outputs(
    root: Path, app_text: str = "print('version 1')\n", extra: dict[str, bytes] | None = None
) -> Path:
    """An outputs dir: rootfs/ with every entry type, snapshot/ with a real meta file, image-config.json."""
    rootfs = root / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    # The shared "base": large files, one compressible, one not (the big-blob paths), identical
    # in every version.
    _file(rootfs / "usr/lib/libbig.so", b"\x7fELF" + b"\0" * (10 * MIB))
    _file(rootfs / "usr/share/random.bin", random.Random(7).randbytes(9 * MIB))
    tool = _file(rootfs / "bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755)  # setuid root (container)
    os.link(tool, rootfs / "bin/tool-again")  # a hard link inside the tree
    ping = _file(rootfs / "bin/ping", b"ping binary", mode=0o755)
    os.setxattr(ping, "security.capability", CAP_NET_RAW)
    ping6 = _file(rootfs / "bin/ping6", b"ping6 binary", mode=0o755)
    os.setxattr(ping6, "security.capability", CAP_NET_RAW_IN_NAMESPACE)
    config = _file(rootfs / "etc/app.conf", b"same bytes\n", owner=1000, mode=0o640)
    os.setxattr(config, "user.note", b"\x00binary\xffvalue")
    _file(rootfs / "etc/copy-of-app.conf", b"same bytes\n")  # same content, not a link: one blob
    _file(rootfs / "usr/share/twin-1", b"twins\n")  # same content and metadata, still two inodes
    _file(rootfs / "usr/share/twin-2", b"twins\n")
    _file(rootfs / "setgid-dir/file", b"", mode=0o2644)  # empty file
    os.chmod(rootfs / "setgid-dir", 0o2775)
    (rootfs / "tmp").mkdir()
    os.chmod(rootfs / "tmp", 0o1777)  # empty dir with the sticky bit
    (rootfs / "empty").mkdir()
    os.symlink("../bin/tool", rootfs / "usr/tool-link")
    os.symlink("/nowhere/at/all", rootfs / "dangling")
    os.lchown(rootfs / "dangling", ID + 7, ID + 8)
    os.utime(rootfs / "dangling", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9), follow_symlinks=False)
    (rootfs / "run").mkdir()
    os.mkfifo(rootfs / "run/fifo")
    os.chmod(rootfs / "run/fifo", 0o620)
    os.chown(rootfs / "run/fifo", ID + 3, ID + 4)
    (rootfs / "dev").mkdir()
    os.mknod(rootfs / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    _file(rootfs / "app/app.py", app_text.encode())
    for name, data in (extra or {}).items():
        _file(rootfs / name, data)
    for directory in (rootfs / "app", rootfs / "bin", rootfs / "empty", rootfs):
        os.chown(directory, ID, ID)
        os.utime(directory, ns=(1_650_000_000 * 10**9, 1_650_000_000 * 10**9))
    snapshot = root / "snapshot"
    snapshot.mkdir()
    _file(snapshot / "memory.img", (app_text.encode() + b"\0" * 4096) * 64)
    write_private(snapshot / SNAPSHOT_FILE, snapshot_meta(rootfs).to_json())
    (root / "image-config.json").write_text(json.dumps({"port": 8080}))
    return root


def snapshot_meta(rootfs: Path) -> GVisorSnapshotMeta:
    spec = SandboxSpec(
        rootfs=rootfs.resolve(),
        process=ProcessConfig(argv=["python3", "/app/app.py"], env={"A": "1"}, workdir="/app", user="0"),
        memory_mib=512,
        rootfs_id_base=ID,
    )
    return GVisorSnapshotMeta(
        driver="gvisor", spec=spec, token="t0k3n", footprint_bytes=123, disk_bytes=456, runsc_version="x"
    )


def describe(root: Path, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Every entry below `root`: type, mode, owner, mtime, content hash, link target, xattrs,
    device numbers, and which earlier path it is a hard link of."""
    tree: dict[str, dict[str, Any]] = {}
    inodes: dict[tuple[int, int], str] = {}
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in [".", *sorted(dirs + files)] if directory == str(root) else sorted(dirs + files):
            path = Path(directory) / name if name != "." else root
            relative = os.path.relpath(path, root)
            if relative in skip:
                continue
            info = os.lstat(path)
            entry: dict[str, Any] = {
                "format": stat.S_IFMT(info.st_mode),
                "mode": stat.S_IMODE(info.st_mode),
                "owner": (info.st_uid, info.st_gid),
                "mtime_ns": info.st_mtime_ns,
                "xattrs": {
                    key: os.getxattr(path, key, follow_symlinks=False)
                    for key in sorted(os.listxattr(path, follow_symlinks=False))
                },
            }
            if stat.S_ISREG(info.st_mode):
                entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            if stat.S_ISLNK(info.st_mode):
                entry["target"] = os.readlink(path)
            if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                entry["rdev"] = (os.major(info.st_rdev), os.minor(info.st_rdev))
            if not stat.S_ISDIR(info.st_mode):
                entry["link_of"] = inodes.setdefault((info.st_dev, info.st_ino), relative)
            tree[relative] = entry
    return tree
