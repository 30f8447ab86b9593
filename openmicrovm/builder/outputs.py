"""A version's build outputs on disk: where they go, how big they are, removing them.

Root filesystems share most files with the build cache and with each other through hard links,
so sizes count every inode once, and deleting reports only the bytes that really come back.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from pathlib import Path

ROOTFS_DIR = "rootfs"
SNAPSHOT_DIR = "snapshot"
IMAGE_CONFIG_FILE = "image-config.json"


def tree_size(path: Path) -> int:
    """Apparent size in bytes of the files below `path`, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    if not path.exists():
        return 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            key = (info.st_dev, info.st_ino)
            if key in seen:
                continue
            seen.add(key)
            if stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
                total += info.st_size
    return total


def _exclusive_bytes(path: Path) -> int:
    """Disk bytes that removing `path` frees: inodes all of whose links lie inside it."""
    links_inside: dict[tuple[int, int], int] = {}
    blocks: dict[tuple[int, int], int] = {}
    nlink: dict[tuple[int, int], int] = {}
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            key = (info.st_dev, info.st_ino)
            links_inside[key] = links_inside.get(key, 0) + 1
            blocks[key] = info.st_blocks * 512
            # Directories' link counts include their subdirectories' "..": they go with the tree.
            nlink[key] = 1 if stat.S_ISDIR(info.st_mode) else info.st_nlink
    return sum(size for key, size in blocks.items() if links_inside[key] >= nlink[key])


def delete_build_outputs(output_dir: Path) -> int:
    """Remove a version's outputs (root filesystem, snapshot, image config); returns bytes freed."""
    if not output_dir.exists():
        return 0
    freed = _exclusive_bytes(output_dir) + os.lstat(output_dir).st_blocks * 512
    shutil.rmtree(output_dir)
    return freed


async def delete_build_outputs_async(output_dir: Path) -> int:
    return await asyncio.to_thread(delete_build_outputs, output_dir)
