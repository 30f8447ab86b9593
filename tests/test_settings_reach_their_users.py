"""Every setting is documented, read from its environment variable, and reaches what it
configures: the drivers (through the registry), builds' and MicroVMs' networks, the CloudWatch
shipper. No module reads OPENMICROVM_* variables of its own."""

from __future__ import annotations

import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest

from openmicrovm.config import Settings, load_settings
from openmicrovm.hostnet import policies
from openmicrovm.hostnet.errors import EgressSettingError
from openmicrovm.logs.cloudwatch import ShipperSettings
from openmicrovm.runtime.gvisor.options import GVisorOptions
from openmicrovm.runtime.options import DriverOptions
from openmicrovm.runtime.registry import DRIVERS, driver_names

ROOT = Path(__file__).resolve().parent.parent
# Variables read outside config.py, and why: not server settings.
OWN_VARIABLES = {
    "openmicrovm/cli/connection.py": {"OPENMICROVM_ENDPOINT"},  # the CLI's, a client
    "openmicrovm/cli/packaging.py": {"OPENMICROVM_ARTIFACT_DIR"},  # the CLI's, a client
    "openmicrovm/runtime/runsc_install.py": {"OPENMICROVM_RUNSC_VERSION_PREFIX"},  # install.sh's tool
}


def environ(tmp_path: Path, **variables: str) -> dict[str, str]:
    """Only these variables: no settings file of this machine's."""
    return {
        "OPENMICROVM_SYSTEM_CONFIG": str(tmp_path / "none.toml"),
        "OPENMICROVM_DATA_DIR": str(tmp_path / "data"),
        **variables,
    }


def test_every_setting_is_in_the_readmes_table() -> None:
    table = ROOT.joinpath("README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\|[^|]*", table, re.M))
    keys = {key for row in documented for key in re.findall(r"`(?:\[\[)?([a-z0-9_]+)(?:\]\])?`", row)}
    missing = sorted({f.name for f in fields(Settings)} - keys - {"quotas"})
    assert not missing, f"settings missing from the README's Configuration table: {missing}"


def _environment_reads(tree: ast.AST) -> set[str]:
    """The OPENMICROVM_* names a module looks up in os.environ (get, [], os.getenv)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        key: ast.expr | None = None
        if isinstance(node, ast.Call) and node.args:
            function = ast.unparse(node.func)
            if function in ("os.environ.get", "os.getenv"):
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            key = node.slice
        if isinstance(key, ast.Constant) and str(key.value).startswith("OPENMICROVM_"):
            found.add(str(key.value))
    return found


def test_no_module_reads_openmicrovm_variables_of_its_own() -> None:
    found: dict[str, set[str]] = {}
    for path in sorted(ROOT.joinpath("openmicrovm").rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        if relative == "openmicrovm/config.py":
            continue
        reads = _environment_reads(ast.parse(path.read_text())) - OWN_VARIABLES.get(relative, set())
        if reads:
            found[relative] = reads
    assert not found, f"read outside config.Settings (make them settings): {found}"
    # The check sees a read when there is one.
    assert _environment_reads(ast.parse('os.environ.get("OPENMICROVM_X")\nos.environ["OPENMICROVM_Y"]')) == {
        "OPENMICROVM_X",
        "OPENMICROVM_Y",
    }


def test_driver_options_come_from_settings_and_their_variables(tmp_path: Path) -> None:
    settings = load_settings(
        environ=environ(
            tmp_path,
            OPENMICROVM_HOST_MEMORY_RESERVE_MIB="300",
            OPENMICROVM_RUNSC="/opt/runsc",
            OPENMICROVM_RUNSC_PLATFORM="systrap",  # the older name of gvisor_platform's variable
            OPENMICROVM_SUSPEND_TO_DISK_AFTER_SECONDS="0",
            OPENMICROVM_RESTORE_POOL_SIZE="3",
            OPENMICROVM_SANDBOX_SUBNET="10.77.0.0/16",
            OPENMICROVM_EGRESS_ALLOW_NETWORKS="192.168.7.0/24",
            OPENMICROVM_BUILD_EGRESS_DENY="203.0.113.0/24",
            OPENMICROVM_MICROVM_EGRESS_DENY="198.51.100.0/24",
        )
    )
    gvisor = GVisorOptions.from_settings(settings)
    assert (gvisor.memory_reserve_mib, gvisor.runsc, gvisor.runsc_platform) == (300, "/opt/runsc", "systrap")
    assert (gvisor.suspend_to_disk_after, gvisor.restore_pool_size) == (0.0, 3)
    assert str(gvisor.egress.subnet) == "10.77.0.0/16"
    assert [str(n) for n in gvisor.egress.allowed] == ["192.168.7.0/24"]
    # MicroVMs are denied the builds' networks too.
    assert [str(n) for n in gvisor.egress.denied] == ["198.51.100.0/24", "203.0.113.0/24"]
    # The process driver takes only what every driver takes.
    assert DriverOptions.from_settings(settings) == DriverOptions(memory_reserve_mib=300)
    assert {driver.name for driver in DRIVERS} == set(driver_names()) == {"gvisor", "process"}


def test_build_and_shipper_settings_reach_them(tmp_path: Path) -> None:
    settings = load_settings(
        environ=environ(
            tmp_path,
            OPENMICROVM_BUILD_SUBNET="10.66.0.0/20",
            OPENMICROVM_BUILD_EGRESS_DENY="203.0.113.0/24, 203.0.113.0/24",
            OPENMICROVM_CLOUDWATCH_BATCH_EVENTS="999999",
            OPENMICROVM_CLOUDWATCH_TIMEOUT_SECONDS="4",
        )
    )
    builds = policies.for_builds(settings)
    assert (str(builds.subnet), builds.subnet_setting) == ("10.66.0.0/20", "build_subnet")
    assert [str(n) for n in builds.denied] == ["203.0.113.0/24"]  # each once
    shipper = ShipperSettings.from_settings(settings)
    assert (shipper.batch_events, shipper.read_timeout_seconds) == (10_000, 4.0)  # capped at the service's


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("OPENMICROVM_BUILD_SUBNET", "8.8.0.0/16", "setting build_subnet: '8.8.0.0/16' must be a private"),
        ("OPENMICROVM_SANDBOX_SUBNET", "10.1.1.1/31", "setting sandbox_subnet"),
        ("OPENMICROVM_SANDBOX_SUBNET", "nonsense", "is not an IPv4 network"),
        ("OPENMICROVM_MICROVM_EGRESS_DENY", "10.0.0.0/33", "setting microvm_egress_deny: '10.0.0.0/33'"),
        ("OPENMICROVM_EGRESS_ALLOW_NETWORKS", "10.0.0.1/8", "did you mean 10.0.0.0/8"),
    ],
)
def test_a_bad_network_setting_names_itself(tmp_path: Path, variable: str, value: str, words: str) -> None:
    settings = load_settings(environ=environ(tmp_path, **{variable: value}))
    with pytest.raises(EgressSettingError, match=re.escape(words)):
        policies.for_builds(settings)
        policies.for_microvms(settings)
