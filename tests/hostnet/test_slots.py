"""The slot protocol builds and MicroVM uplinks share (hostnet/slots.py), on its own: names,
leases, the host-wide lock, and sweeps that keep live holders and remove the rest."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from openmicrovm.hostnet.slots import LeaseTable, SlotNames, process_alive, this_process

NAMES = SlotNames(link_prefix="omvt", table_prefix="omvt_", netns_prefix="omvt-")


def test_names_and_their_parsers_agree() -> None:
    assert (NAMES.link(0x1A2B), NAMES.table(0x1A2B), NAMES.netns(0x1A2B)) == (
        "omvt1a2bh",
        "omvt_1a2b",
        "omvt-1a2b",
    )
    assert NAMES.link_pattern.match(NAMES.link(7)) and not NAMES.link_pattern.match("omvs0007h")
    # Tables of other kinds are not this kind's slots.
    assert NAMES.present(["omvt_0003", "omvs_0004", "omvt_zzzz", "other"]) >= {3}
    assert 4 not in NAMES.present(["omvs_0004"])


def test_leases_are_taken_lowest_first_released_and_never_twice(tmp_path: Path) -> None:
    table = LeaseTable(tmp_path / "leases")

    async def take(holder: str, count: int = 3) -> int | None:
        async with table.locked():
            return table.take(holder, count)

    assert asyncio.run(take("a")) == 0
    assert asyncio.run(take("b")) == 1
    assert (table.holder(0), table.holder(1), table.holder(2)) == ("a", "b", None)
    table.release(0)
    assert asyncio.run(take("c")) == 0  # the lowest free again
    assert asyncio.run(take("d")) == 2
    assert asyncio.run(take("e")) is None  # all three leased
    assert table.leased() == {0, 1, 2}
    assert oct((tmp_path / "leases").stat().st_mode & 0o777) == "0o700"


def test_many_takers_at_once_get_distinct_slots(tmp_path: Path) -> None:
    """Leases are taken under one lock: 20 takers in two processes never share a slot."""
    table = LeaseTable(tmp_path / "leases")
    script = f"""
import asyncio, json
from pathlib import Path
from openmicrovm.hostnet.slots import LeaseTable
table = LeaseTable(Path({str(tmp_path / "leases")!r}))
async def take(n):
    async with table.locked():
        return table.take(f"other {{n}}", 64)
async def main():
    return await asyncio.gather(*(take(n) for n in range(10)))
print(json.dumps(asyncio.run(main())))
"""
    other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)

    async def ours() -> list[int | None]:
        async def take(n: int) -> int | None:
            async with table.locked():
                await asyncio.sleep(0)
                return table.take(f"ours {n}", 64)

        return await asyncio.gather(*(take(n) for n in range(10)))

    mine = asyncio.run(ours())
    theirs = json.loads(other.communicate(timeout=60)[0])
    every = [*mine, *theirs]
    assert None not in every and len(set(every)) == 20
    assert table.leased() == set(every)


def test_a_sweep_keeps_live_holders_and_removes_the_rest_lease_last(tmp_path: Path) -> None:
    table = LeaseTable(tmp_path / "leases")
    dead = subprocess.run(
        [sys.executable, "-c", "from openmicrovm.hostnet.slots import this_process; print(this_process())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    holders = {0: this_process(), 1: dead, 2: "not a holder at all"}

    async def scenario() -> tuple[list[int], list[tuple[int, bool]]]:
        async with table.locked():
            for index in (0, 1, 2):
                assert table.take(holders[index], 8) == index
        removed: list[tuple[int, bool]] = []

        async def remove(index: int) -> None:
            removed.append((index, table.path(index).exists()))  # the lease is still there

        swept = await table.sweep({0, 1, 2, 5}, process_alive, remove)
        return swept, removed

    swept, removed = asyncio.run(scenario())
    # 5 has host objects and no lease (a lease is taken before anything is made, so nobody is
    # making them): leftovers, removed like a dead holder's.
    assert swept == [1, 2, 5]
    assert removed == [(1, True), (2, True), (5, False)]
    assert table.leased() == {0}
    assert process_alive(this_process()) and not process_alive(dead) and not process_alive("pid x y")
