"""Unpacking real zip archives: every way a hostile or broken artifact is refused, and a good one."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from openmicrovm.builder import unpack as unpack_module
from openmicrovm.builder.cleanup import Aborted
from openmicrovm.builder.errors import (
    ARCHIVE_DOCKERFILE_NOT_FOUND,
    ARCHIVE_INVALID,
    DISK_STORAGE_FULL,
    BuildFailed,
)
from openmicrovm.builder.unpack import UnpackLimits, unpack_artifact, unpack_artifact_async
from tests.builder.zips import Entry, directory, file, hardlink, special, symlink, write_zip

DOCKERFILE = file("Dockerfile", "FROM public.ecr.aws/lambda/microvms:al2023-minimal\n")


def unpack(tmp_path: Path, entries: list[Entry], limits: UnpackLimits | None = None) -> Path:
    archive = write_zip(tmp_path / "artifact.zip", entries)
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    unpack_artifact(archive, build_dir / "context", limits)
    return build_dir / "context"


def refused(tmp_path: Path, entries: list[Entry], limits: UnpackLimits | None = None) -> BuildFailed:
    with pytest.raises(BuildFailed) as caught:
        unpack(tmp_path, entries, limits)
    # Nothing of the archive may exist anywhere but the build's own directory.
    outside = sorted(p.name for p in tmp_path.iterdir())
    assert outside == ["artifact.zip", "build"], outside
    return caught.value


def test_a_good_zip_unpacks_with_modes_links_and_times(tmp_path: Path) -> None:
    context = unpack(
        tmp_path,
        [
            DOCKERFILE,
            file("app/run.sh", "#!/bin/sh\necho hi\n", 0o755),
            file("app/data.txt", "data"),
            directory("empty"),
            symlink("app/current", "data.txt"),
            symlink("top", "app/../app/data.txt"),
            hardlink("app/data-again.txt", "app/data.txt"),
        ],
    )
    assert (context / "Dockerfile").read_text().startswith("FROM ")
    assert stat.S_IMODE((context / "app/run.sh").stat().st_mode) == 0o755
    assert os.readlink(context / "app/current") == "data.txt"
    assert (context / "top").read_text() == "data"
    assert (context / "app/data-again.txt").stat().st_ino == (context / "app/data.txt").stat().st_ino
    assert (context / "empty").is_dir()
    assert (context / "app/data.txt").stat().st_mtime > 1_700_000_000  # the zip's 2024 timestamp


def test_not_a_zip_is_archive_invalid(tmp_path: Path) -> None:
    (tmp_path / "artifact.zip").write_bytes(b"this is not a zip archive at all")
    with pytest.raises(BuildFailed) as caught:
        unpack_artifact(tmp_path / "artifact.zip", tmp_path / "context")
    assert caught.value.code == ARCHIVE_INVALID
    assert caught.value.state_reason.startswith("ARCHIVE_INVALID: The code artifact is not a valid zip")
    assert not (tmp_path / "context").exists()


def test_no_dockerfile_at_the_root(tmp_path: Path) -> None:
    failure = refused(tmp_path, [file("app.py", "print(1)")])
    assert failure.code == ARCHIVE_DOCKERFILE_NOT_FOUND
    assert failure.state_reason.startswith("ARCHIVE_DOCKERFILE_NOT_FOUND: ")


def test_a_dockerfile_only_in_a_subdirectory_fails_and_says_where_it_is(tmp_path: Path) -> None:
    failure = refused(tmp_path, [file("src/Dockerfile", "FROM x\n"), file("src/app.py")])
    assert failure.code == ARCHIVE_DOCKERFILE_NOT_FOUND
    assert "src/Dockerfile" in failure.state_reason


def test_a_lower_case_dockerfile_does_not_count(tmp_path: Path) -> None:
    assert refused(tmp_path, [file("dockerfile", "FROM x\n")]).code == ARCHIVE_DOCKERFILE_NOT_FOUND


@pytest.mark.parametrize(
    ("entries", "named", "why"),
    [
        ([DOCKERFILE, file("../evil.txt", "x")], "../evil.txt", "'..'"),
        ([DOCKERFILE, file("app/../../evil.txt", "x")], "app/../../evil.txt", "'..'"),
        ([DOCKERFILE, file("..\\evil.txt", "x")], "..\\evil.txt", "'..'"),
        ([DOCKERFILE, file("/etc/evil.txt", "x")], "/etc/evil.txt", "absolute"),
        ([DOCKERFILE, file("C:/evil.txt", "x")], "C:/evil.txt", "absolute"),
        ([DOCKERFILE, symlink("link", "../../etc/passwd")], "link", "outside the build context"),
        ([DOCKERFILE, symlink("link", "/etc/passwd")], "link", "absolute path"),
        ([DOCKERFILE, directory("a"), symlink("a/up", "../..")], "a/up", "outside the build context"),
        # Each link alone stays inside; followed together they leave the context.
        ([DOCKERFILE, symlink("s", "."), symlink("p", "s/q/../..")], "p", "outside the build context"),
        ([DOCKERFILE, symlink("loop1", "loop2"), symlink("loop2", "loop1")], "loop", "loop"),
        (
            [DOCKERFILE, symlink("etc", "/etc"), file("etc/cron.d/evil", "x")],
            "etc/cron.d/evil",
            "not a directory",
        ),
        ([DOCKERFILE, hardlink("shadow", "../../etc/shadow")], "shadow", "outside the build context"),
        ([DOCKERFILE, hardlink("shadow", "/etc/shadow")], "shadow", "absolute path"),
        (
            [DOCKERFILE, directory("sub"), symlink("d", "sub"), hardlink("hl", "d/../../outside")],
            "'hl'",
            "outside the build context",
        ),
        ([DOCKERFILE, special("null", stat.S_IFCHR)], "null", "device file"),
        ([DOCKERFILE, special("disk", stat.S_IFBLK)], "disk", "device file"),
        ([DOCKERFILE, special("pipe", stat.S_IFIFO)], "pipe", "FIFO"),
        ([DOCKERFILE, special("sock", stat.S_IFSOCK)], "sock", "socket"),
        ([DOCKERFILE, file("twice", "1"), file("./twice", "2")], "twice", "more than once"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "backslash-dotdot",
        "absolute",
        "drive-letter",
        "symlink-escape",
        "symlink-absolute",
        "symlink-escape-from-subdir",
        "symlink-chain-escape",
        "symlink-loop",
        "write-through-symlink",
        "hardlink-escape",
        "hardlink-absolute",
        "hardlink-through-symlink",
        "char-device",
        "block-device",
        "fifo",
        "socket",
        "duplicate",
    ],
)
def test_hostile_entries_are_archive_invalid_naming_the_entry(
    tmp_path: Path, entries: list[Entry], named: str, why: str
) -> None:
    failure = refused(tmp_path, entries)
    assert failure.code == ARCHIVE_INVALID
    assert failure.state_reason.startswith("ARCHIVE_INVALID: ")
    assert named in failure.state_reason
    assert why in failure.state_reason


def test_zip_bomb_over_the_size_limit_is_refused_while_counting_real_bytes(tmp_path: Path) -> None:
    # 64 MiB of zeros compresses to ~64 KiB; the limit is 8 MiB.
    bomb = file("zeros.bin", bytes(64 * 1024 * 1024))
    failure = refused(tmp_path, [DOCKERFILE, bomb], UnpackLimits(max_total_bytes=8 * 1024 * 1024))
    assert failure.code == ARCHIVE_INVALID
    assert "zeros.bin" in failure.state_reason or "8388608" in failure.state_reason


def test_lying_size_headers_do_not_get_past_the_byte_count(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "artifact.zip", [DOCKERFILE, file("zeros.bin", bytes(4 * 1024 * 1024))])
    # Rewrite the central directory's uncompressed size of zeros.bin to 1 byte.
    data = bytearray(archive.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    assert data[central + 46 : central + 46 + 9] == b"zeros.bin"
    data[central + 24 : central + 28] = (1).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    (tmp_path / "build").mkdir()
    with pytest.raises(BuildFailed) as caught:
        unpack_artifact(archive, tmp_path / "build" / "context", UnpackLimits(max_total_bytes=1024 * 1024))
    assert caught.value.code == ARCHIVE_INVALID
    written = sum(p.stat().st_size for p in (tmp_path / "build").rglob("*") if p.is_file())
    assert written <= 1024 * 1024


def test_too_many_files_is_refused(tmp_path: Path) -> None:
    entries = [DOCKERFILE, *(file(f"f{i}.txt", "x") for i in range(20))]
    failure = refused(tmp_path, entries, UnpackLimits(max_files=10))
    assert failure.code == ARCHIVE_INVALID
    assert "21 entries" in failure.state_reason


def test_setuid_bits_are_not_created_on_the_host(tmp_path: Path) -> None:
    context = unpack(tmp_path, [DOCKERFILE, file("tool", "#!/bin/sh\n", 0o4755)])
    assert stat.S_IMODE((context / "tool").stat().st_mode) == 0o755


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, to run out of space for real."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], check=False
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_running_out_of_disk_is_disk_storage_full(tmp_path: Path, tiny_filesystem: Path) -> None:
    archive = write_zip(tmp_path / "artifact.zip", [DOCKERFILE, file("big.bin", os.urandom(2 * 1024 * 1024))])
    with pytest.raises(BuildFailed) as caught:
        unpack_artifact(archive, tiny_filesystem / "context")
    assert caught.value.code == DISK_STORAGE_FULL
    assert caught.value.state_reason.startswith(
        "DISK_STORAGE_FULL: The build ran out of disk space while unpacking"
    )


def test_a_corrupted_entry_is_archive_invalid(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "artifact.zip", [DOCKERFILE, file("data.txt", "hello " * 1000)])
    data = bytearray(archive.read_bytes())
    start = data.find(b"data.txt") + len(b"data.txt") + 10  # inside the compressed bytes
    data[start] ^= 0xFF
    archive.write_bytes(bytes(data))
    (tmp_path / "build").mkdir()
    with pytest.raises(BuildFailed) as caught:
        unpack_artifact(archive, tmp_path / "build" / "context")
    assert caught.value.code == ARCHIVE_INVALID
    assert "entry 'data.txt' cannot be decompressed" in caught.value.state_reason


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ([DOCKERFILE, file("n" * 5000, "x")], "names are limited to 255 bytes"),
        ([DOCKERFILE, file("dir/" + "é" * 128 + "/f", "x")], "name of 256 bytes"),  # 2 bytes a char
        ([DOCKERFILE, file("/".join(["d" * 200] * 20), "x")], "path longer than 3072 bytes"),
        ([DOCKERFILE, symlink("far", "x/" * 2048)], "oversized"),
    ],
    ids=["component-5000", "component-256-utf8", "path-4000", "symlink-target-4096"],
)
def test_overlong_names_are_archive_invalid_without_the_servers_paths(
    tmp_path: Path, entries: list[Entry], why: str
) -> None:
    failure = refused(tmp_path, entries)
    assert failure.code == ARCHIVE_INVALID
    assert why in failure.state_reason, failure.state_reason
    assert str(tmp_path) not in failure.state_reason
    assert len(failure.state_reason) < 600, failure.state_reason  # the name is shortened


def test_names_at_the_limits_unpack(tmp_path: Path) -> None:
    longest = "n" * 255
    context = unpack(tmp_path, [DOCKERFILE, file(f"{longest}/{longest}", "x"), symlink("far", "x/" * 2047)])
    assert (context / longest / longest).read_text() == "x"


def test_links_through_links_within_the_hop_limit_unpack(tmp_path: Path) -> None:
    # A chain of 40 links is what the kernel follows; the 41st link deeper is a loop to it.
    chain = [symlink("l0", "data.txt")] + [symlink(f"l{i}", f"l{i - 1}") for i in range(1, 40)]
    context = unpack(tmp_path, [DOCKERFILE, file("data.txt", "end"), *chain])
    assert (context / "l39").read_text() == "end"
    deeper = tmp_path / "deeper"
    deeper.mkdir()
    failure = refused(deeper, [DOCKERFILE, file("data.txt", "end"), *chain, symlink("l40", "l39")])
    assert "entry 'l40' is part of a symlink loop" in failure.state_reason


def _stored_zip(path: Path, entries: list[Entry]) -> Path:
    """write_zip without compression: 100,000 entries are written in seconds."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for entry in entries:
            info = zipfile.ZipInfo(entry.name, date_time=(2024, 1, 2, 3, 4, 6))
            info.create_system = 3
            info.external_attr = (entry.mode & 0xFFFF) << 16
            archive.writestr(info, entry.data)
    return path


def _hundred_thousand_entries() -> tuple[list[Entry], int]:
    """100,000 entries in the shapes that made planning slow: deep paths, long link targets through
    deep directories, and links that name other links many times (each level doubles the work of
    a planner that does not remember a resolved link: 2**30 steps). Returns them and the links."""
    deep = "/".join(["d"] * 200)
    levels = 30
    fan = [symlink("f0", "data.txt")]
    fan += [symlink(f"f{k}", f"f{k - 1}/../f{k - 1}/../f{k - 1}") for k in range(1, levels)]
    entries = [DOCKERFILE, file("data.txt", "x"), *fan]
    count = (100_000 - len(entries)) // 2
    entries += [file(f"{deep}/file{i}") for i in range(count)]
    entries += [symlink(f"link{i}", f"{deep}/{'../' * 200}{deep}/file{i}") for i in range(count)]
    entries += [symlink(f"top{i}", f"f{levels - 1}") for i in range(100_000 - len(entries))]
    return entries, len(entries) - count - 2


def test_a_100000_entry_zip_plans_each_link_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries, links = _hundred_thousand_entries()
    assert len(entries) == 100_000
    archive = _stored_zip(tmp_path / "big.zip", entries)
    follows = 0
    follow = unpack_module._follow

    def counted(*args: object, **kwargs: object) -> object:
        nonlocal follows
        follows += 1
        return follow(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(unpack_module, "_follow", counted)
    abort = threading.Event()
    outcome: list[object] = []

    def plan() -> None:
        with zipfile.ZipFile(archive) as opened:
            try:
                outcome.append(unpack_module._plan(opened, UnpackLimits(), abort))
            except BaseException as error:  # reported by the assertion below
                outcome.append(error)

    # A watchdog, not a timing: the old planner needed hours here (2**30 steps for one link).
    worker = threading.Thread(target=plan, daemon=True)
    worker.start()
    worker.join(timeout=300)
    abort.set()  # a planner still running stops at its next check
    assert outcome, "planning 100,000 entries did not finish within the 300 s watchdog"
    assert isinstance(outcome[0], unpack_module._Plan), outcome[0]
    # Linear: each link's target is followed exactly once, however often other links name it.
    assert follows == links


def test_a_cancelled_unpack_stops_planning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [DOCKERFILE, *(file(f"f{i}") for i in range(20_000))]
    archive = _stored_zip(tmp_path / "big.zip", entries)
    context = tmp_path / "context"
    planning = threading.Event()
    release = threading.Event()
    classified = 0
    classify = unpack_module._classify

    def paused(*args: object) -> object:
        nonlocal classified
        classified += 1
        if classified == 100:  # planning is under way: hold it until the build is cancelled
            planning.set()
            release.wait()
        return classify(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(unpack_module, "_classify", paused)

    async def cancel_while_planning() -> None:
        task = asyncio.create_task(unpack_artifact_async(archive, context))
        await asyncio.to_thread(planning.wait)
        task.cancel()
        # Let the task see its cancellation (in_thread sets the abort flag) before planning resumes.
        for _ in range(5):
            await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_while_planning())
    assert classified < len(entries) // 2, "planning went on after the build was cancelled"
    assert not context.exists()


def test_an_aborted_unpack_writes_nothing(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "artifact.zip", [DOCKERFILE, file("a.txt", "x")])
    aborted = threading.Event()
    aborted.set()
    with pytest.raises(Aborted):
        unpack_artifact(archive, tmp_path / "context", None, aborted)
    assert not (tmp_path / "context").exists()


def test_implied_directories_count_against_the_file_limit(tmp_path: Path) -> None:
    # One 3000-byte name implies ~1500 directories: without a bound, 100,000 of them are 150 million.
    entries = [DOCKERFILE, *(file(f"top{i}/" + "/".join(["d"] * 20) + "/f", "x") for i in range(5))]
    failure = refused(tmp_path, entries, UnpackLimits(max_files=50))
    assert failure.code == ARCHIVE_INVALID
    assert "more than 50 directories" in failure.state_reason
