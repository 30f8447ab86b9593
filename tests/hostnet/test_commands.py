"""The host-network commands on their own: the kernel's list of nftables tables (nft_tables.py),
read in a namespace of the test's own, and Batched, which runs many callers' lines as one command."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

from openmicrovm.hostnet import nft_tables
from openmicrovm.hostnet.commands import Batched
from openmicrovm.hostnet.errors import HostNetworkError
from openmicrovm.runtime import netns


def test_the_kernel_lists_the_same_inet_tables_as_nft() -> None:
    name = f"omvtest-{uuid.uuid4().hex[:8]}"
    tables = [f"omvt_{index:04x}" for index in range(40)]

    async def scenario() -> None:
        await netns.create(name)
        try:
            assert await netns.call_in_namespace(name, nft_tables.table_names) == []
            script = "".join(f"add table inet {table}\n" for table in tables)
            script += "add table ip omvt_other_family\n"
            subprocess.run(
                ["ip", "netns", "exec", name, "nft", "-f", "-"], input=script, text=True, check=True
            )
            listed = await netns.call_in_namespace(name, nft_tables.table_names)
            assert sorted(listed) == tables  # inet only: the ip table is another family's
            nft = subprocess.run(
                ["ip", "netns", "exec", name, "nft", "list", "tables", "inet"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            assert sorted(word for word in nft if word.startswith("omvt_")) == tables
        finally:
            await netns.delete(name)
        assert not netns.exists(name)

    asyncio.run(scenario())


def test_batched_runs_lines_that_arrive_together_in_one_process(tmp_path: Path) -> None:
    output, runs = tmp_path / "lines", tmp_path / "runs"
    batched = Batched(["sh", "-c", f"cat >> {output}; echo run >> {runs}"])

    async def scenario() -> None:
        await asyncio.gather(*(batched.submit(f"line {number}\n") for number in range(50)))
        await batched.submit("after\n")  # a later caller gets a run of its own

    asyncio.run(scenario())
    lines = output.read_text().splitlines()
    assert sorted(lines[:-1]) == sorted(f"line {number}" for number in range(50))
    assert lines[-1] == "after"
    assert 2 <= len(runs.read_text().splitlines()) < 51
    asyncio.run(scenario())  # and again on another event loop
    assert len(output.read_text().splitlines()) == 102


def test_every_caller_of_a_failed_batch_hears_of_it(tmp_path: Path) -> None:
    failing = Batched(["sh", "-c", "cat > /dev/null; echo refused; exit 3"])
    tolerant = Batched(["sh", "-c", "cat > /dev/null; exit 3"], check=False)

    async def scenario() -> None:
        outcomes = await asyncio.gather(*(failing.submit("x\n") for _ in range(5)), return_exceptions=True)
        assert all(
            isinstance(outcome, HostNetworkError) and "refused" in str(outcome) for outcome in outcomes
        )
        await asyncio.gather(*(tolerant.submit("x\n") for _ in range(5)))

    asyncio.run(scenario())
