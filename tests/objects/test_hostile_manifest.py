"""A manifest from a damaged or hostile store cannot make fetch write outside its cache dir, follow
a symlink, or plant what a build could not have made."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from openmicrovm.objects import ObjectStore, ObjectStoreError, fetch, publish

BLOB = b"hostile bytes\n"
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


def _entry(path: str, kind: str = "file", **fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": path, "type": kind, "mode": 0o644, "uid": 0, "gid": 0, "mtime_ns": 0}
    if kind == "file":
        entry.update(size=len(BLOB), sha256=BLOB_SHA)
    if kind == "dir":
        entry["mode"] = 0o755
    entry.update(fields)
    return entry


def _put_manifest(store: ObjectStore, entries: list[dict[str, Any]]) -> str:
    """Store a manifest the way a hostile writer with store access would: valid name, valid hash."""
    store.put_if_absent(store.location.blob_key(BLOB_SHA), BLOB, {"encoding": "identity"})
    document = json.dumps({"format": 1, "entries": entries}, sort_keys=True).encode()
    sha = hashlib.sha256(document).hexdigest()
    store.put(store.location.manifest_key(sha), document, {"encoding": "identity"})
    return store.location.manifest_uri(sha)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """What a hostile manifest aims at: a directory and a file outside the cache."""
    target = tmp_path / "outside"
    target.mkdir()
    (target / "secret").write_text("keep me\n")
    os.chmod(target / "secret", 0o600)
    return target


def _untouched(outside: Path) -> None:
    assert sorted(path.name for path in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "keep me\n"
    info = os.stat(outside / "secret")
    assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (0, 0, 0o600)


def _no_tree(cache_root: Path) -> None:
    left = (
        [path.name for path in cache_root.iterdir() if path.name not in (".locks", "manifests")]
        if cache_root.exists()
        else []
    )
    assert left == []


ROOT = _entry(".", "dir")


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        pytest.param(lambda out: [ROOT, _entry("../escape")], "has an empty, '.', '..'", id="dotdot"),
        pytest.param(
            lambda out: [ROOT, _entry("a/../../escape")], "has an empty, '.', '..'", id="dotdot-inside"
        ),
        pytest.param(
            lambda out: [ROOT, _entry(str(out / "planted"))], "is not a relative path", id="absolute"
        ),
        pytest.param(lambda out: [ROOT, _entry("./x")], "has an empty, '.', '..'", id="dot"),
        pytest.param(lambda out: [ROOT, _entry("a//b")], "has an empty, '.', '..'", id="empty-component"),
        pytest.param(
            lambda out: [ROOT, _entry("link", "symlink", target=str(out)), _entry("link/planted")],
            "is not below a directory declared before it",
            id="symlinked-parent",
        ),
        pytest.param(
            lambda out: [ROOT, _entry("late/file"), _entry("late", "dir")],
            "is not below a directory declared before it",
            id="parent-after-child",
        ),
        pytest.param(lambda out: [ROOT, _entry("x"), _entry("x")], "appears twice", id="duplicate"),
        pytest.param(lambda out: [_entry("x")], "first entry must be the tree's own directory", id="no-root"),
        pytest.param(
            lambda out: [
                ROOT,
                _entry("x", xattrs={"trusted.overlay.redirect": base64.b64encode(b"/etc").decode()}),
            ],
            "is not one an image may carry",
            id="overlay-xattr",
        ),
        pytest.param(
            lambda out: [ROOT, _entry("sda", "block", rdev=[8, 0])],
            "not one an image may hold",
            id="block-device",
        ),
        pytest.param(
            lambda out: [ROOT, _entry("mem", "char", rdev=[1, 1])], "not one an image may hold", id="dev-mem"
        ),
        pytest.param(lambda out: [ROOT, _entry("x", mode=0o170777)], "mode", id="file-type-bits-in-mode"),
        pytest.param(lambda out: [ROOT, _entry("x", uid=-1)], "uid", id="negative-uid"),
        pytest.param(
            lambda out: [
                ROOT,
                _entry("a", link_group=0),
                _entry("b", "symlink", target="/etc", link_group=0),
            ],
            "hard-link group 0 with a different file",
            id="mixed-link-group",
        ),
        pytest.param(lambda out: [ROOT, _entry("x", sha256="../../etc/passwd")], "sha256", id="bad-sha"),
    ],
)
def test_a_hostile_manifest_is_refused(
    store: ObjectStore, tmp_path: Path, outside: Path, entries: Any, reason: str
) -> None:
    uri = _put_manifest(store, entries(outside))
    cache_root = tmp_path / "cache"
    with pytest.raises(ObjectStoreError, match="is refused") as caught:
        asyncio.run(fetch(store, uri, cache_root))
    assert reason in str(caught.value)
    _untouched(outside)
    _no_tree(cache_root)


def test_links_in_a_tree_are_never_followed(store: ObjectStore, tmp_path: Path, outside: Path) -> None:
    """Valid but pointed: symlinks to outside files, hard-linked symlinks, owners and modes on
    them. Fetch makes them as entries and changes nothing they point at."""
    secret = str(outside / "secret")
    uri = _put_manifest(
        store,
        [
            ROOT,
            _entry("to-secret", "symlink", target=secret, uid=100000, link_group=0),
            _entry("again", "symlink", target=secret, uid=100000, link_group=0),
            _entry("to-outside", "symlink", target=str(outside), mode=0o777),
            _entry("setuid", mode=0o4777, uid=100000),
        ],
    )
    fetched = asyncio.run(fetch(store, uri, tmp_path / "cache"))
    _untouched(outside)
    assert os.readlink(fetched / "to-secret") == secret
    assert os.lstat(fetched / "again").st_ino == os.lstat(fetched / "to-secret").st_ino
    assert os.lstat(fetched / "to-secret").st_uid == 100000
    assert (os.stat(fetched / "setuid").st_mode & 0o7777, os.stat(fetched / "setuid").st_uid) == (
        0o4777,
        100000,
    )


def test_a_tree_with_a_dangerous_device_is_not_published(store: ObjectStore, tmp_path: Path) -> None:
    import stat

    outputs = tmp_path / "outputs"
    (outputs / "rootfs/dev").mkdir(parents=True)
    os.mknod(outputs / "rootfs/dev/sda", stat.S_IFBLK | 0o600, os.makedev(8, 0))
    with pytest.raises(
        ObjectStoreError, match=r"rootfs/dev/sda.*block device 8:0 is not one an image may hold"
    ):
        asyncio.run(publish(store, outputs))
    assert not [key for key in store.list_keys(store.location.key("manifests") + "/")]


def test_a_manifest_of_another_store_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a manifest of the object store"):
        asyncio.run(fetch(store, f"s3://elsewhere/fleet/a/manifests/{'a' * 64}.json", tmp_path / "cache"))
