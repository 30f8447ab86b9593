"""The LogStore on real files: the cap, rotation, offsets that survive rotation and restarts."""

from __future__ import annotations

from pathlib import Path

from openmicrovm.logs.store import LogStore, split_line


def _messages(lines: list[str]) -> list[str]:
    return [split_line(line)[1] for line in lines]


def _read_all(store: LogStore, stream: str, offset: int = 0) -> tuple[list[str], int, int]:
    """Every line from `offset` on, page by page: (messages, next offset, skipped bytes)."""
    messages: list[str] = []
    skipped = 0
    while True:
        chunk = store.read_from(stream, offset, 1)
        skipped += chunk.skipped
        messages += _messages(chunk.lines)
        offset = chunk.next_offset
        if offset >= chunk.end_offset:
            return messages, offset, skipped


def test_the_cap_holds_and_the_newest_lines_survive(tmp_path: Path) -> None:
    store = LogStore(tmp_path, max_bytes=2000, keep_files=3)
    for index in range(1000):
        store.append("microvms/microvm-1", f"line {index}")
    files = store.files("microvms/microvm-1")
    assert len(files) == 3
    assert all(file.stat().st_size <= 2000 for file in files)
    assert store.size("microvms/microvm-1") <= 3 * 2000
    messages = _messages(list(store.read("microvms/microvm-1")))
    assert messages[-1] == "line 999"
    # What is kept is a contiguous tail of what was written.
    first = int(messages[0].split()[1])
    assert messages == [f"line {index}" for index in range(first, 1000)]


def test_one_huge_message_cannot_break_the_cap(tmp_path: Path) -> None:
    store = LogStore(tmp_path, max_bytes=4096, keep_files=1)
    store.append("builds/b", "x" * 100_000)
    store.append("builds/b", "\n".join(f"row {i}" for i in range(5000)))
    assert store.size("builds/b") <= 4096
    messages = _messages(list(store.read("builds/b")))
    assert messages[-1] == "row 4999"


def test_offsets_stay_valid_across_rotation_and_a_restart(tmp_path: Path) -> None:
    store = LogStore(tmp_path, max_bytes=600, keep_files=2)
    follower_offset = 0
    seen: list[str] = []
    written: list[str] = []
    for index in range(200):
        for line in (f"event {index}", f"event {index} again"):
            written.append(line)
        store.append("microvms/m", f"event {index}\nevent {index} again")
        if index % 3 == 0:  # a reader that keeps up, reading now and then
            messages, follower_offset, skipped = _read_all(store, "microvms/m", follower_offset)
            assert skipped == 0
            seen += messages
    reopened = LogStore(tmp_path, max_bytes=600, keep_files=2)
    messages, end, skipped = _read_all(reopened, "microvms/m", follower_offset)
    assert skipped == 0
    seen += messages
    assert seen == written
    assert end == reopened.end_offset("microvms/m")


def test_a_reader_that_fell_behind_is_told_what_it_missed(tmp_path: Path) -> None:
    store = LogStore(tmp_path, max_bytes=500, keep_files=2)
    for index in range(100):
        store.append("builds/b", f"line {index}")
    messages, _end, skipped = _read_all(store, "builds/b", 0)
    assert skipped > 0
    assert messages[-1] == "line 99"
    assert messages == [f"line {i}" for i in range(100 - len(messages), 100)]


def test_delete_removes_everything_of_a_stream(tmp_path: Path) -> None:
    store = LogStore(tmp_path, max_bytes=300, keep_files=3)
    for index in range(100):
        store.append("builds/gone", f"line {index}")
    store.append("builds/kept", "stays")
    store.delete("builds/gone")
    assert sorted(p.name for p in (tmp_path / "builds").iterdir()) == ["kept.log"]
    assert not store.exists("builds/gone")
    store.append("builds/gone", "a fresh start")
    assert _messages(list(store.read("builds/gone"))) == ["a fresh start"]
