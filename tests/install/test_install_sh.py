"""install.sh on each kind of host, through a fake os-release: what its --plan says it would
change (and that --plan changes nothing), what it refuses, and what --uninstall removes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from openmicrovm.runtime import runsc_install
from tests.install.apt_repo import isolated_apt, make_repo

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "install.sh"
OS_RELEASES = {
    "debian12": 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\n'
    "VERSION_CODENAME=bookworm\nID=debian\n",
    "debian13": 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nNAME="Debian GNU/Linux"\nVERSION_ID="13"\n'
    "VERSION_CODENAME=trixie\nID=debian\n",
    "debian11": 'PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"\nVERSION_ID="11"\nID=debian\n',
    "ubuntu2404": 'PRETTY_NAME="Ubuntu 24.04.1 LTS"\nNAME="Ubuntu"\nVERSION_ID="24.04"\nID=ubuntu\nID_LIKE=debian\n',
    "ubuntu2204": 'PRETTY_NAME="Ubuntu 22.04.4 LTS"\nNAME="Ubuntu"\nVERSION_ID="22.04"\nID=ubuntu\nID_LIKE=debian\n',
    "fedora": 'NAME="Fedora Linux"\nVERSION_ID=40\nID=fedora\nPRETTY_NAME="Fedora Linux 40 (Server Edition)"\n',
}
APT_FILES = (
    Path("/etc/apt/sources.list.d/openmicrovm-trixie.sources"),
    Path("/etc/apt/preferences.d/openmicrovm-trixie"),
)

pytestmark = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="install.sh runs on Debian")


def host_state() -> dict[str, object]:
    """What a --plan must leave as it is: install.sh's apt files, its record, the venv."""
    return {
        "apt": {str(path): path.read_bytes() if path.exists() else None for path in APT_FILES},
        "record": os.path.exists("/var/lib/openmicrovm-install"),
        "venv": (ROOT / ".venv").exists() and os.stat(ROOT / ".venv").st_mtime_ns,
    }


def run(
    tmp_path: Path, system: str, *args: str, env: dict[str, str] | None = None, user: int | None = None
) -> subprocess.CompletedProcess[str]:
    release = tmp_path / f"os-release-{system}"
    release.write_text(OS_RELEASES[system])
    release.chmod(0o644)
    environ = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path / "home"),
        "OPENMICROVM_OS_RELEASE": str(release),
        "OPENMICROVM_INSTALL_STATE": str(tmp_path / "state"),
        **(env or {}),
    }
    argv = ["sh", str(INSTALL), *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(
        argv, capture_output=True, text=True, env=environ, timeout=120, stdin=subprocess.DEVNULL
    )


def apt_mirror_of(codename: str) -> str | None:
    listed = subprocess.run(
        ["apt-get", "indextargets", "--format", "$(TARGET_OF) $(IDENTIFIER) $(CODENAME) $(REPO_URI)"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    for line in listed:
        parts = line.split()
        if parts[:3] == ["deb", "Packages", codename]:
            return parts[3].rstrip("/")
    return None


@pytest.fixture
def unchanged() -> Iterator[None]:
    before = host_state()
    yield
    assert host_state() == before


def test_the_pin_is_the_one_runsc_install_keeps() -> None:
    pin = re.search(r"^runsc_pin=(\S+)$", INSTALL.read_text(), re.MULTILINE)
    assert pin is not None and f"{pin.group(1)}." == runsc_install.VERSION_PREFIX


def test_debian_12_plans_a_pinned_trixie_source_on_apts_own_mirror(tmp_path: Path, unchanged: None) -> None:
    mirror = apt_mirror_of("bookworm")
    if mirror is None:
        pytest.skip("this host's apt has no bookworm source")
    result = run(tmp_path, "debian12", "--plan", "--dev")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "on this host (Debian GNU/Linux 12 (bookworm)) install.sh will:" in out
    assert re.search(
        rf"(add|rewrite) {APT_FILES[0]}, a Debian trixie source on the host's mirror {mirror},", out
    )
    for line in ("Types: deb", f"URIs: {mirror}", "Suites: trixie", "Components: main"):
        assert f"      {line}\n" in out
    assert "      Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n" in out
    assert re.search(rf"(add|rewrite) {APT_FILES[1]}, which pins every trixie package at -1", out)
    assert "      Pin: release o=Debian,n=trixie\n      Pin-Priority: -1\n" in out
    assert re.search(
        r"refresh apt's index of that source only .*\n  - fetch runsc 0\.0~20240729 with apt-get download"
        r"|fetch no runsc: \S+ is the pinned",
        out,
    )
    assert f"Python environment {ROOT / '.venv'}" in out and "pip install -e .[dev]" in out
    assert "fetch the web console's xterm.js (pinned, sha512-checked) from the npm registry" in out
    assert f"record what it added in {tmp_path / 'state'}" in out
    assert out.endswith("install.sh: --plan: nothing was changed\n")
    assert not (tmp_path / "state").exists()


def test_with_an_empty_cache_the_plan_fetches_through_the_refreshed_source(
    tmp_path: Path, unchanged: None
) -> None:
    cache = tmp_path / "cache"
    result = run(tmp_path, "debian12", "--plan", env={"OPENMICROVM_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr
    assert "  - refresh apt's index of that source only (apt-get update of " in result.stdout
    assert (
        f"  - fetch runsc 0.0~20240729 with apt-get download and put its binary in {cache}/runsc/"
        in result.stdout
    )


def test_the_mirror_can_be_named(tmp_path: Path, unchanged: None) -> None:
    result = run(
        tmp_path, "debian12", "--plan", env={"OPENMICROVM_DEBIAN_MIRROR": "http://mirror.example/debian/"}
    )
    assert result.returncode == 0, result.stderr
    assert "      URIs: http://mirror.example/debian\n" in result.stdout
    assert "pip install -e .)" in result.stdout  # no [dev]


def test_debian_13_plans_debians_own_runsc(tmp_path: Path, unchanged: None) -> None:
    apt_etc = tmp_path / "etc-apt"
    result = run(tmp_path, "debian13", "--plan", env={"OPENMICROVM_APT_ETC": str(apt_etc)})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "on this host (Debian GNU/Linux 13 (trixie)) install.sh will:" in out
    assert "use Debian 13's own runsc (0.0~20240729, from the runsc package)" in out
    assert "trixie source" not in out and "Pin-Priority" not in out and "apt-get download" not in out
    assert "remove " not in out
    # runsc is one of the packages: to install, or there already.
    assert re.search(r"install Debian packages.* runsc|all it needs is there \(.* runsc ", out)
    # A host upgraded from Debian 12 with install.sh's files still there: they go first.
    for sub, name in (
        ("sources.list.d", "openmicrovm-trixie.sources"),
        ("preferences.d", "openmicrovm-trixie"),
    ):
        (apt_etc / sub).mkdir(parents=True)
        (apt_etc / sub / name).write_text("x\n")
    out = run(tmp_path, "debian13", "--plan", env={"OPENMICROVM_APT_ETC": str(apt_etc)}).stdout
    assert (
        f"  - remove {apt_etc}/sources.list.d/openmicrovm-trixie.sources, which install.sh added on Debian 12"
        in out
    )
    assert (
        f"  - remove {apt_etc}/preferences.d/openmicrovm-trixie, which install.sh added on Debian 12" in out
    )
    assert (apt_etc / "preferences.d" / "openmicrovm-trixie").exists()


@pytest.mark.parametrize(
    ("system", "message"),
    [
        ("ubuntu2404", "Ubuntu 24.04 is not supported. Its archive has no runsc (gVisor)"),
        (
            "ubuntu2204",
            "Ubuntu 22.04.4 LTS is not supported: install.sh supports Debian 12 (bookworm) and Debian 13",
        ),
        (
            "fedora",
            "Fedora Linux 40 (Server Edition) is not supported: install.sh supports Debian 12 (bookworm)",
        ),
        ("debian11", "Debian GNU/Linux 11 (bullseye) is not supported"),
    ],
)
def test_other_systems_are_refused_with_what_is_supported(
    tmp_path: Path, system: str, message: str, unchanged: None
) -> None:
    for args in (("--plan",), ()):  # before anything: the plan is not even printed
        result = run(tmp_path, system, *args)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.startswith(f"install.sh: {message}")
        assert "Debian 12" in result.stderr


def test_a_missing_os_release_is_refused(tmp_path: Path, unchanged: None) -> None:
    result = run(tmp_path, "debian12", "--plan", env={"OPENMICROVM_OS_RELEASE": str(tmp_path / "none")})
    assert result.returncode == 1 and "cannot read" in result.stderr and "Debian 12" in result.stderr


def test_bad_arguments_are_refused(tmp_path: Path, unchanged: None) -> None:
    for args in (("--purge",), ("--uninstall", "--dev"), ("--frobnicate",)):
        result = run(tmp_path, "debian12", *args)
        assert result.returncode == 2 and result.stderr.startswith("usage:")


@pytest.fixture
def world_readable_copy() -> Iterator[Path]:
    """install.sh in a dir that an unprivileged user can reach (pytest's tmp dirs are root's)."""
    directory = Path(tempfile.mkdtemp(prefix="omv-install-test-"))
    directory.chmod(0o755)
    shutil.copy(INSTALL, directory / "install.sh")
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to become nobody"
)
def test_not_root_is_refused_but_may_see_the_plan(world_readable_copy: Path, unchanged: None) -> None:
    nobody = 65534
    release = world_readable_copy / "os-release"
    release.write_text(OS_RELEASES["debian12"])
    release.chmod(0o644)
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(world_readable_copy),
        "OPENMICROVM_OS_RELEASE": str(release),
        "OPENMICROVM_DEBIAN_MIRROR": "http://mirror.example/debian",
    }

    def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
        argv = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups"]
        argv += ["sh", str(world_readable_copy / "install.sh"), *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)

    for args in ((), ("--dev",), ("--uninstall",)):
        refused = as_nobody(*args)
        assert refused.returncode == 1 and refused.stdout == "", refused
        assert refused.stderr.startswith("install.sh: run as root")
    plan = as_nobody("--plan")
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.endswith("--plan: nothing was changed\n")


def make_record(tmp_path: Path) -> dict[str, Path]:
    """A host after install.sh: its record, a fetched runsc, its apt files, a venv, data."""
    paths = {
        "state": tmp_path / "state",
        "apt": tmp_path / "etc-apt",
        "cache": tmp_path / "xdg-cache" / "openmicrovm",
        "data": tmp_path / "xdg-data" / "openmicrovm",
    }
    fetched = paths["cache"] / "runsc" / "0.0~20240729.0-4+b7"
    fetched.mkdir(parents=True)
    (fetched / "runsc").write_text("binary")
    (fetched / "source.json").write_text("{}")
    other = paths["cache"] / "runsc" / "made-by-hand"  # no source.json: not runsc_install's
    other.mkdir()
    (other / "runsc").write_text("binary")
    console = paths["cache"] / "console" / "vendor" / "xterm+xterm@6.0.0"  # vendor_install's
    console.mkdir(parents=True)
    (console / "pin.json").write_text("{}")
    paths["state"].mkdir()
    (paths["state"] / "runsc").write_text(f"{fetched}\n{other}\n")
    # No longer installed: nothing to remove (tests add packages to the record to see more).
    (paths["state"] / "packages").write_text("openmicrovm-no-such-package\n")
    for sub, name in (
        ("sources.list.d", "openmicrovm-trixie.sources"),
        ("preferences.d", "openmicrovm-trixie"),
    ):
        (paths["apt"] / sub).mkdir(parents=True)
        (paths["apt"] / sub / name).write_text("x\n")
    (paths["apt"] / "sources.list.d" / "debian.sources").write_text("the host's\n")
    (paths["data"] / "images").mkdir(parents=True)
    paths["fetched"], paths["other"], paths["console"] = fetched, other, console
    return paths


def uninstall_env(tmp_path: Path, paths: dict[str, Path]) -> dict[str, str]:
    return {
        "OPENMICROVM_APT_ETC": str(paths["apt"]),
        "XDG_CACHE_HOME": str(paths["cache"].parent),
        "XDG_DATA_HOME": str(paths["data"].parent),
    }


def test_uninstall_plan_lists_what_install_sh_added_and_what_it_keeps(
    tmp_path: Path, unchanged: None
) -> None:
    paths = make_record(tmp_path)
    # python3 was not install.sh's here, but the record is all that counts: so it shows that a
    # recorded package that others depend on is kept; libc6 is one that apt would not remove.
    with open(paths["state"] / "packages", "a") as record:
        record.write("python3\nlibc6\n")
    result = run(tmp_path, "debian12", "--uninstall", "--plan", env=uninstall_env(tmp_path, paths))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"  - {paths['apt']}/sources.list.d/openmicrovm-trixie.sources (install.sh's trixie source" in out
    assert f"  - {paths['apt']}/preferences.d/openmicrovm-trixie" in out
    assert f"  - {paths['fetched']} (the runsc install.sh fetched)" in out
    assert str(paths["other"]) not in out
    assert f"  - {paths['console']} (a web console asset install.sh fetched)" in out
    assert "  - packages install.sh installed that it must not remove:\n" in out
    assert re.search(r"\n      python3 \(needed by [^)]*python3-venv[^)]*\)\n", out)
    assert "\n      libc6 (apt would not remove it: E: " in out
    assert "openmicrovm-no-such-package" not in out and "apt-get remove" not in out
    assert (
        f"the data dir {paths['data']} and the cache dir {paths['cache']} (./install.sh --uninstall --purge"
        in out
    )
    assert out.endswith("install.sh: --plan: nothing was changed\n")
    assert (paths["fetched"] / "runsc").exists() and (paths["state"] / "packages").exists()
    purge = run(tmp_path, "debian12", "--uninstall", "--purge", "--plan", env=uninstall_env(tmp_path, paths))
    assert f"--purge: {paths['data']} and {paths['cache']}" in purge.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="--uninstall runs as root")
@pytest.mark.parametrize("purge", [False, True])
def test_uninstall_removes_what_install_sh_added(
    world_readable_copy: Path, tmp_path: Path, purge: bool
) -> None:
    """A real --uninstall of a copy of the checkout, whose apt dir, record and dirs are the test's
    own. Its record names no installed package, and an apt-get that only simulates stands in for
    the real one, so that a mistake cannot remove a package of this machine."""
    paths = make_record(tmp_path)
    venv = world_readable_copy / ".venv"
    (venv / "bin").mkdir(parents=True)
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "apt-get").write_text(
        '#!/bin/sh\ncase " $* " in *" -s "*) exec /usr/bin/apt-get "$@" ;; esac\n'
        'echo "test guard: refused apt-get $*" >&2\nexit 99\n'
    )
    (guard / "apt-get").chmod(0o755)
    environ = {
        "PATH": f"{guard}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path),
        "OPENMICROVM_INSTALL_STATE": str(paths["state"]),
        **uninstall_env(tmp_path, paths),
    }
    argv = ["sh", str(world_readable_copy / "install.sh"), "--uninstall", *(["--purge"] if purge else [])]
    result = subprocess.run(argv, capture_output=True, text=True, env=environ, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(
        "install.sh: uninstalled; apt forgets the trixie index at its next apt-get update\n"
    )
    assert sorted(p.name for p in paths["apt"].rglob("*") if p.is_file()) == ["debian.sources"]
    assert not paths["fetched"].exists() and not venv.exists() and not paths["state"].exists()
    assert not paths["console"].exists()
    if purge:
        assert not paths["data"].exists() and not paths["cache"].exists()
    else:
        assert (paths["data"] / "images").is_dir() and (paths["other"] / "runsc").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="apt-get update of a local repository")
def test_the_planned_pin_keeps_trixie_from_being_installed_but_not_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The very pin and source text the Debian 12 plan shows, given to an apt of its own with a
    local trixie repository: apt never picks trixie's runsc by itself, and runsc_install still
    downloads the pinned version."""
    plan = run(
        tmp_path, "debian12", "--plan", env={"OPENMICROVM_DEBIAN_MIRROR": "http://mirror.example/debian"}
    )
    assert plan.returncode == 0, plan.stderr
    source, pin = [], []
    target = None
    for line in plan.stdout.splitlines():
        if line.startswith(("  - add ", "  - rewrite ")):
            target = source if "a Debian trixie source on the host's mirror" in line else pin
        elif line.startswith("      ") and target is not None:
            target.append(line.strip())
        else:
            target = None
    repo = make_repo(tmp_path / "repo")
    local = "\n".join(source).replace("URIs: http://mirror.example/debian", f"URIs: {repo.uri}")
    local = re.sub(r"Signed-By: \S+", "Trusted: yes", local) + "\n"
    apt = isolated_apt(tmp_path / "apt", local)
    (apt.preferences / "openmicrovm-trixie").write_text("\n".join(pin) + "\n")
    assert apt.apt.run("apt-get", "update").returncode == 0
    policy = apt.apt.run("apt-cache", "policy", "runsc").stdout
    assert "Candidate: (none)" in policy and re.search(r"0\.0~20240729\.0-4\+b7 -1\n", policy), policy
    assert (
        "0 upgraded, 0 newly installed"
        in apt.apt.run("apt-get", "-s", "install", "runsc").stdout
        + apt.apt.run("apt-get", "-s", "upgrade").stdout
    )
    monkeypatch.setattr(runsc_install, "system_is_pinned", lambda prefix: None)
    installed = runsc_install.install(tmp_path / "cache", apt=apt.apt, source=apt.source)
    assert installed.version == "0.0~20240729.0"


def test_before_any_apt_update_the_mirror_comes_from_the_sources(tmp_path: Path, unchanged: None) -> None:
    """A fresh host (a container, say) has no apt lists yet: the sources' own suite names do."""
    (tmp_path / "lists" / "partial").mkdir(parents=True)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    config = tmp_path / "apt.conf"
    config.write_text(
        f'Dir::State::Lists "{tmp_path / "lists"}";\nDir::Etc::sourcelist "/dev/null";\n'
        f'Dir::Etc::sourceparts "{tmp_path / "sources.list.d"}";\n'
    )
    result = run(tmp_path, "debian12", "--plan", env={"APT_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert "a Debian trixie source on the host's mirror http://mirror.example/debian, signed" in result.stdout
    # The admin's own trixie source is left to the admin: no source and no pin of install.sh's.
    (tmp_path / "sources.list.d" / "trixie.sources").write_text(
        "Types: deb\nURIs: http://other.example/debian\nSuites: trixie\nComponents: main\n"
    )
    result = run(tmp_path, "debian12", "--plan", env={"APT_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert (
        f"add no apt source: apt already has trixie ({tmp_path / 'sources.list.d' / 'trixie.sources'}:1)"
        in (result.stdout)
    )
    assert "Pin-Priority" not in result.stdout and "openmicrovm-trixie.sources" not in result.stdout


def test_the_pin_is_in_place_before_apt_installs_anything(world_readable_copy: Path, tmp_path: Path) -> None:
    """A trixie source of ours without its pin (a copied /etc/apt, an interrupted run) must not
    upgrade the system to trixie: the pin is written before the first apt-get install. Every
    package is reported missing, and an apt-get stand-in records whether the pin was there when it
    was asked to install, then stops the run (nothing is installed, no venv is made)."""
    apt_etc = tmp_path / "apt"
    (apt_etc / "sources.list.d").mkdir(parents=True)
    (apt_etc / "preferences.d").mkdir()
    (apt_etc / "sources.list.d" / "openmicrovm-trixie.sources").write_text("Types: deb\nSuites: trixie\n")
    pin = apt_etc / "preferences.d" / "openmicrovm-trixie"
    seen = tmp_path / "seen"
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")
    (guard / "apt-get").write_text(
        # The host's own sources may name trixie already; these name bookworm only.
        '#!/bin/sh\ncase " $* " in *" indextargets "*) '
        'echo "deb Packages bookworm http://mirror.example/debian/ /etc/apt/sources.list:1"; exit 0 ;; esac\n'
        f'case " $* " in *" install "*) [ -e {pin} ] && echo pinned >>{seen} || echo unpinned >>{seen}; '
        "exit 99 ;; esac\nexit 0\n"
    )
    for tool in ("dpkg-query", "apt-get"):
        (guard / tool).chmod(0o755)
    release = tmp_path / "os-release"
    release.write_text(OS_RELEASES["debian12"])
    environ = {
        "PATH": f"{guard}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path),
        "OPENMICROVM_OS_RELEASE": str(release),
        "OPENMICROVM_INSTALL_STATE": str(tmp_path / "state"),
        "OPENMICROVM_APT_ETC": str(apt_etc),
        "OPENMICROVM_DEBIAN_MIRROR": "http://mirror.example/debian",
    }
    argv = ["sh", str(world_readable_copy / "install.sh")]
    result = subprocess.run(
        argv, capture_output=True, text=True, env=environ, timeout=120, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 99, result.stdout + result.stderr
    assert seen.read_text() == "pinned\n"
    assert not (world_readable_copy / ".venv").exists()
