"""Sizes and deletion of build outputs whose files are shared through hard links."""

from __future__ import annotations

import os
from pathlib import Path

from openmicrovm.builder.outputs import delete_build_outputs, tree_size


def test_tree_size_counts_each_inode_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(bytes(1000))
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / "c").write_bytes(bytes(24))
    assert tree_size(tmp_path) == 1024


def test_delete_frees_only_what_no_one_else_links_to(tmp_path: Path) -> None:
    shared = tmp_path / "cache" / "layer-file"
    shared.parent.mkdir()
    shared.write_bytes(os.urandom(1 << 20))
    version = tmp_path / "versions" / "1.0"
    (version / "rootfs").mkdir(parents=True)
    os.link(shared, version / "rootfs" / "shared")
    (version / "snapshot").mkdir()
    (version / "snapshot" / "memory").write_bytes(os.urandom(3 << 20))
    (version / "rootfs" / "own").write_bytes(os.urandom(1 << 20))
    os.link(version / "rootfs" / "own", version / "rootfs" / "own-again")  # both links go with the tree

    freed = delete_build_outputs(version)

    assert not version.exists()
    assert shared.read_bytes()  # still there for its other users
    assert 4 << 20 <= freed < 5 << 20, freed
    assert delete_build_outputs(version) == 0
