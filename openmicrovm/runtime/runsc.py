"""Which runsc (gVisor) binary the gvisor driver runs, and what that binary can do.

Two kinds of runsc can be on a host:
  - Debian 12's package, /usr/bin/runsc 0.0~20221219: ptrace platform only, and its checkpoint
    cannot save an epoll instance watching a listening socket (every asyncio app);
  - a newer build that runsc_install.py keeps in <cache dir>/runsc/<version>/runsc (Debian 13's
    0.0~20240729): those checkpoints work, its netstack moves 2.5x the bytes per second, and it
    also has the systrap platform.

The driver runs new sandboxes with the newest runsc that works (or the one the setting `runsc`,
$OPENMICROVM_RUNSC, names). A runsc checkpoint can only be restored by a runsc of the
same version, so every sandbox and snapshot remembers the binary (and its version) it was made
with, and is restored, checkpointed and deleted with that one.

The platform is ptrace unless the setting `gvisor_platform` ($OPENMICROVM_RUNSC_PLATFORM) says
systrap. Measured on the 2-core project machine (2026-11, runsc 0.0~20240729, bench_runtime.py and
interleaved A/B runs; the machine was shared and noisy): systrap makes syscall-heavy work 1.3-7x
faster (20,000 stat() calls: 120-270 ms against 350-890 ms) and a concurrent endpoint load ~10 %
faster. But every running sandbox, even one whose app only sleeps, burns 1.6-2.9 % of a CPU (its
sentry re-evaluates the systrap fast path every 400 us; ptrace: 0.03-0.2 %), takes 10-20 MiB more
PSS, and the paths the MicroVM goals are about got slower: one small request 10.7 ms against
7.3 ms (16-23 against 8-10 when the cores were contended), a warm-pool restore to first 200 37 ms
against 23, a resume from memory 22 ms against 10 (sentry and stub threads hand each other every
syscall through futex wake-ups, which are dear on this virtual machine's idle vCPUs). On a host of
a few cores running many mostly idle MicroVMs that is the wrong trade, so systrap is opt-in: worth
it for syscall-heavy apps on hosts with cores to spare.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openmicrovm.config import default_cache_dir
from openmicrovm.private_files import write_private_file

ENV_BINARY = "OPENMICROVM_RUNSC"  # the setting runsc, named in errors
CACHE_SUBDIR = "runsc"  # <cache dir>/runsc/<Debian version>/runsc
SYSTEM_RUNSC = "/usr/bin/runsc"
# Never kvm: /dev/kvm on these hosts is PVM, where the kvm platform hangs.
PREFERRED_PLATFORMS = ("ptrace", "systrap")

_VERSION = re.compile(r"runsc version (\S+)")
_BUILD_DATE = re.compile(r"(\d{8})")
_PLATFORMS = re.compile(r"specifies which platform to use: ([^\n]*)")


@dataclass(frozen=True)
class Runsc:
    path: str
    version: str  # as `runsc --version` says, e.g. "0.0~20240729.0"
    flags: frozenset[str]  # the global flags it accepts, without the dash
    platforms: tuple[str, ...]
    checkpoint_flags: frozenset[str] = frozenset()  # the flags of `runsc checkpoint`, likewise

    @property
    def build_date(self) -> int:
        """YYYYMMDD of the gVisor release (0 when the version does not say)."""
        found = _BUILD_DATE.search(self.version)
        return int(found.group(1)) if found else 0

    def has_flag(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def default_platform(self) -> str:
        """ptrace (see the module docstring for why not systrap), else whatever the build has."""
        return next((p for p in PREFERRED_PLATFORMS if p in self.platforms), self.platforms[0])

    def describe(self) -> str:
        return f"runsc {self.version} ({self.path})"


class RunscError(Exception):
    pass


_probed: dict[tuple[str, int, int], Runsc | None] = {}
# What probes found, kept across processes: a probe runs each runsc three times, about 150 ms
# of every server start. Keyed like _probed (path, mtime, size), so a changed binary is probed
# again; a binary that did not run is not kept (the next start tries it again).
PROBES_FILE = "probed.json"


def _run(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None


def _output(argv: list[str]) -> str:
    """What a command printed, both streams (runsc prints its help to stderr); "" if it did not run."""
    done = _run(argv)
    return (done.stdout + done.stderr) if done is not None else ""


def _flags_in(help_text: str) -> frozenset[str]:
    """The flags a runsc help text lists (`  -name ...` lines), without the dash."""
    return frozenset(re.findall(r"^\s+-([A-Za-z0-9_-]+)", help_text, re.MULTILINE))


def probe(path: str | os.PathLike[str]) -> Runsc | None:
    """What the binary at path is, or None when it does not run here (cached per file version)."""
    path = os.path.abspath(path)
    try:
        info = os.stat(path)
    except OSError:
        return None
    key = (path, info.st_mtime_ns, info.st_size)
    if key in _probed:
        return _probed[key]
    found: Runsc | None = _saved_probe(key)
    if found is None:
        found = _run_probe(path)
        if found is not None:
            _save_probe(key, found)
    _probed[key] = found
    return found


def _run_probe(path: str) -> Runsc | None:
    found: Runsc | None = None
    version = _run([path, "--version"])
    if version is not None and version.returncode == 0 and (match := _VERSION.search(version.stdout)):
        text = _output([path, "flags"])
        platforms_line = _PLATFORMS.search(text)
        platforms = tuple(
            re.findall(r"[a-z]+", re.sub(r"\(default[^)]*\)", "", platforms_line.group(1)))
            if platforms_line
            else ("ptrace",)
        )
        checkpoint_flags = _flags_in(_output([path, "checkpoint", "--help"]))
        found = Runsc(path, match.group(1), _flags_in(text), platforms, checkpoint_flags)
    return found


def _probes_file() -> Path:
    return default_cache_dir() / CACHE_SUBDIR / PROBES_FILE


def _probe_key(key: tuple[str, int, int]) -> str:
    return json.dumps(key)


def _saved_probes() -> dict[str, Any]:
    try:
        saved = json.loads(_probes_file().read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _saved_probe(key: tuple[str, int, int]) -> Runsc | None:
    entry = _saved_probes().get(_probe_key(key))
    try:
        return Runsc(
            key[0],
            str(entry["version"]),
            frozenset(map(str, entry["flags"])),
            tuple(map(str, entry["platforms"])),
            frozenset(map(str, entry["checkpoint_flags"])),
        )
    except (TypeError, KeyError):  # none saved, or not in this form
        return None


def _save_probe(key: tuple[str, int, int], found: Runsc) -> None:
    saved = _saved_probes()
    saved[_probe_key(key)] = {
        "version": found.version,
        "flags": sorted(found.flags),
        "platforms": list(found.platforms),
        "checkpoint_flags": sorted(found.checkpoint_flags),
    }
    try:
        _probes_file().parent.mkdir(parents=True, exist_ok=True)
        write_private_file(_probes_file(), json.dumps(saved, indent=1).encode(), durable=False)
    except OSError:
        pass  # a cache: the next start probes again


def cached_binaries(cache_dir: Path) -> list[Path]:
    """Every runsc that runsc_install.py put in this cache dir."""
    root = cache_dir / CACHE_SUBDIR
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    # Not the dot-dirs an install in progress works in.
    return [
        entry / "runsc" for entry in entries if not entry.name.startswith(".") and (entry / "runsc").is_file()
    ]


def default_cache_dirs() -> list[Path]:
    """Where runsc_install.py installs by default (the settings' default cache dir)."""
    return [default_cache_dir()]


def system_binary() -> str | None:
    return shutil.which("runsc") or (SYSTEM_RUNSC if os.access(SYSTEM_RUNSC, os.X_OK) else None)


def installed(cache_dirs: list[Path] | None = None) -> list[Runsc]:
    """Every working runsc here, newest first: the cached builds, then the one on PATH."""
    dirs = list(cache_dirs or []) + [d for d in default_cache_dirs() if d not in (cache_dirs or [])]
    paths: list[str] = [str(p) for d in dirs for p in cached_binaries(d)]
    system = system_binary()
    if system is not None:
        paths.append(system)
    found: dict[str, Runsc] = {}
    for path in paths:
        runsc = probe(path)
        if runsc is not None and runsc.path not in found:
            found[runsc.path] = runsc
    return sorted(found.values(), key=lambda r: r.build_date, reverse=True)


def choose(explicit: str | None = None, cache_dirs: list[Path] | None = None) -> Runsc:
    """The runsc for new sandboxes: `explicit` (the setting runsc) when given, else the newest
    working one. Raises RunscError saying why there is none."""
    if explicit:
        path = explicit if os.sep in explicit else shutil.which(explicit)
        runsc = probe(path) if path else None
        if runsc is None:
            raise RunscError(
                f"the setting runsc (${ENV_BINARY}) names {explicit}, which does not run here "
                f"(`{explicit} --version` fails)"
            )
        return runsc
    found = installed(cache_dirs)
    if not found:
        if system_binary() is None:
            raise RunscError("runsc is not installed (apt-get install runsc)")
        raise RunscError("no working runsc (`runsc --version` fails; reinstall: apt-get install runsc)")
    return found[0]


def choose_platform(runsc: Runsc, explicit: str | None = None) -> str:
    wanted = explicit or runsc.default_platform
    if wanted not in runsc.platforms:
        raise RunscError(
            f"{runsc.describe()} has no {wanted!r} platform (it has {', '.join(runsc.platforms)})"
        )
    return wanted


def with_version(version: str, preferred: Runsc, cache_dirs: list[Path] | None = None) -> Runsc | None:
    """A runsc of exactly this version (the one that wrote a checkpoint), preferring `preferred`."""
    if preferred.version == version:
        return preferred
    return next((r for r in installed(cache_dirs) if r.version == version), None)
