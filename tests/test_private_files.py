"""Private dirs (0700) and key files (0600 from creation, fsync, atomic rename), for the helper and
for every key the server writes: the database that holds the token keys, the TLS CA and server
keys; the data and cache dirs of a real server."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from openmicrovm import private_files
from openmicrovm.endpoint.tls import CA_KEY, SERVER_KEY, issue_server_certificate
from openmicrovm.private_files import private_dir, write_private_file
from openmicrovm.service.core import legacy_keyring_file
from openmicrovm.service.token_seal import KeyRing, TokenClaims, load_keyring
from openmicrovm.store import Store
from tests.support.server import ServerProcess


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: whatever mode a file gets, the code chose it."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_a_key_is_0600_before_its_first_byte_and_replaced_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_umask: None
) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(b"old key")
    key.chmod(0o644)
    events: list[str] = []
    real_write, real_fsync, real_replace = os.write, os.fsync, os.replace

    def write(fd: int, data: bytes) -> int:
        status = os.fstat(fd)
        # The file the key goes into is private before its first byte; the old key is whole.
        assert stat.S_IMODE(status.st_mode) == 0o600
        assert status.st_size == 0 or events
        assert key.read_bytes() == b"old key"
        events.append("write")
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(source: os.PathLike[str], target: os.PathLike[str]) -> None:
        assert Path(source).parent == tmp_path  # same dir: the rename is atomic
        events.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_private_file(key, b"new key")
    assert events == ["write", "fsync file", "rename", "fsync dir"]
    assert key.read_bytes() == b"new key" and mode(key) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"]


def test_a_write_that_fails_half_way_leaves_the_old_key_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "key.pem"
    write_private_file(key, b"old key")
    real_write = os.write

    def crash(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[:3]))  # part of the new key is on disk...
        raise OSError(28, "No space left on device")  # ...when the disk fills up

    monkeypatch.setattr(os, "write", crash)
    with pytest.raises(OSError):
        write_private_file(key, b"new key")
    assert key.read_bytes() == b"old key"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"]  # no temporary file left


def test_a_reader_never_sees_a_key_half_written(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    versions = [bytes([65 + n % 26]) * 65536 for n in range(300)]
    write_private_file(key, versions[0])
    seen: set[bytes] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.add(key.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for data in versions:
            write_private_file(key, data)
    finally:
        done.set()
        reader.join()
    assert seen and seen <= set(versions), "a reader saw a truncated or mixed key"


def test_a_stale_temporary_name_is_never_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Someone made the temporary name first (a symlink to a file of theirs): O_EXCL refuses it and
    # another name is used, so nothing is written through the link.
    victim = tmp_path / "victim"
    victim.write_bytes(b"theirs")
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(private_files.secrets, "token_hex", lambda _n: next(names))
    (tmp_path / ".key.pem.aaaa.tmp").symlink_to(victim)
    write_private_file(tmp_path / "key.pem", b"secret")
    assert victim.read_bytes() == b"theirs"
    assert (tmp_path / "key.pem").read_bytes() == b"secret"


def test_token_keys_live_in_a_private_database_and_tls_keys_are_written_privately_and_durably(
    tmp_path: Path, open_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    legacy = legacy_keyring_file(data)
    # Keys an older openmicrovm kept in a file: imported once, so that its tokens stay valid.
    private_dir(legacy.parent, "token keys dir")
    write_private_file(legacy, json.dumps({"current": "old", "keys": {"old": "11" * 32}}).encode())
    old_claims = TokenClaims("000000000000", "microvm-old", ((8080, 8080),), "endpoint", 0.0, 9e9, "old")
    old_token = KeyRing({"old": bytes.fromhex("11" * 32)}, "old").seal(old_claims)
    store = Store(f"sqlite:///{data / 'openmicrovm.db'}")
    try:
        ring = load_keyring(store, legacy)
        assert ring.open(old_token) == old_claims and not legacy.exists()
        claims = TokenClaims("000000000000", "microvm-x", ((8080, 8080),), "endpoint", 0.0, 9e9, "id")
        assert load_keyring(store, legacy).open(ring.seal(claims)) == claims  # what was stored reads back
    finally:
        store.close()
    assert mode(data / "openmicrovm.db") == 0o600
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    tls = tmp_path / "tls"
    tls.mkdir()
    issue_server_certificate(tls, ["us-east-1"])
    assert mode(tls / CA_KEY) == 0o600 and mode(tls / SERVER_KEY) == 0o600
    # Each key: the new file's content, then the directory that holds the rename.
    assert synced.count(str(tls)) == 2, synced


def test_private_dir_makes_missing_parents_0700_and_tightens_with_a_warning(
    tmp_path: Path, open_umask: None, caplog: pytest.LogCaptureFixture
) -> None:
    made = private_dir(tmp_path / "a" / "b" / "data", "data dir")
    assert [mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", made)] == [0o700] * 3
    shared = tmp_path / "shared"
    shared.mkdir(0o755)
    with caplog.at_level(logging.WARNING, logger="openmicrovm.private_files"):
        private_dir(shared, "cache dir")
    assert mode(shared) == 0o700
    assert any(
        r.levelno == logging.WARNING and "cache dir" in r.getMessage() and "0755" in r.getMessage()
        for r in caplog.records
    ), caplog.records
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="openmicrovm.private_files"):
        private_dir(shared, "cache dir")  # already private: nothing to say
    assert not caplog.records


def test_the_server_keeps_its_data_and_cache_dirs_private(
    tmp_path: Path, make_server: Callable[..., ServerProcess]
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(0o755)
    os.chmod(cache, 0o755)
    data = tmp_path / "server0"  # make_server's first data dir
    data.mkdir()
    os.chmod(data, 0o755)
    server = make_server({"cache_dir": str(cache)})
    server.client().list_microvm_images()
    assert mode(data) == 0o700 and mode(cache) == 0o700
    if (data / "openmicrovm.db").exists():  # SQLite: it holds the token keys
        assert mode(data / "openmicrovm.db") == 0o600
    log = server.log()
    assert f"the data dir {data} was accessible to other users (mode 0755); made it 0700" in log
    assert f"the cache dir {cache} was accessible to other users (mode 0755); made it 0700" in log
