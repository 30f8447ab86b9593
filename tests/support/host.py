"""What tests look for on the host itself."""

from __future__ import annotations

from pathlib import Path


def processes_naming(fragment: str) -> dict[int, str]:
    """pid -> command line (NULs as spaces) of every live process whose command line contains
    fragment. A zombie's command line is empty, so it never matches."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if fragment in cmdline:
            found[int(entry.name)] = cmdline.strip()
    return found
