"""The pieces around the drivers: host report, driver choice, image lookups, naming, cgroup parsing."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from openmicrovm.runtime import DriverError, ProcessConfig, make_driver, names, rootfs
from openmicrovm.runtime.cgroups import _v1_mounts
from openmicrovm.runtime.host import MemoryGate
from openmicrovm.runtime.host_report import describe_host
from openmicrovm.runtime.registry import missing_for
from tests.runtime.conftest import run


def test_describe_host_reports_drivers_and_the_default() -> None:
    report = run(describe_host())
    assert set(report.drivers) == {"gvisor", "process"}
    for state in report.drivers.values():
        assert state == "available" or state.startswith("missing: ")
    available = [name for name, state in report.drivers.items() if state == "available"]
    assert report.default_driver == (available[0] if available else None)
    assert report.memory_total_mib > 0 and report.to_dict()["kernel"] == os.uname().release
    assert {tool.name for tool in report.tools} >= {"runsc", "bwrap", "ip", "gcc"}


def test_auto_prefers_gvisor_and_says_which_driver_it_chose(
    tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() != 0:
        pytest.skip("drivers need root")
    with caplog.at_level(logging.INFO, logger="openmicrovm.runtime"):
        driver = make_driver("auto", tmp_path, cache_dir)
    expected = "gvisor" if not missing_for("gvisor") else "process"
    assert driver.name == expected
    assert f"sandbox driver: {expected}" in caplog.text


def test_image_lookups_stay_inside_the_image(tmp_path: Path) -> None:
    root = tmp_path / "image"
    (root / "etc").mkdir(parents=True)
    (root / "bin").mkdir()
    outside = tmp_path / "host-passwd"
    outside.write_text("root:x:0:0:root:/root:/bin/sh\nintruder:x:4242:4242::/:/bin/sh\n")
    # An absolute symlink in an image means the image's own /, never the host's.
    (root / "etc" / "passwd").symlink_to(outside)
    with pytest.raises(DriverError, match="user 'intruder' is not in the image's /etc/passwd"):
        rootfs.resolve_user(root, "intruder")
    (root / "etc" / "passwd").unlink()
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1001:\nextra:x:2000:app\n")
    user = rootfs.resolve_user(root, "app")
    assert (user.uid, user.gid, user.groups, user.home) == (1000, 1001, (1001, 2000), "/home/app")
    assert rootfs.resolve_user(root, "4000").gid == 0  # unknown numeric uid: gid 0, like runc
    assert rootfs.resolve_user(root, "app:root").groups == (0,)
    (root / "bin" / "tool").write_text("#!/bin/sh\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "bin" / "escape").symlink_to("../../../../../../bin/sh")
    rootfs.check_process(root, ProcessConfig(argv=["tool"], env={"PATH": "/bin"}))
    with pytest.raises(DriverError, match="entrypoint '/bin/escape' does not exist in the image"):
        rootfs.check_process(root, ProcessConfig(argv=["/bin/escape"]))


def test_host_names_fit_the_kernel() -> None:
    scope = names.scope_for(Path("/var/lib/openmicrovm"), "gvisor")
    host = names.host_names(scope, names.new_key())
    assert names.key_of_netns(scope, host.netns) == host.key
    assert names.key_of_netns(scope, host.peer_netns) == host.key
    assert names.key_of_container(host.container) == host.key
    assert names.key_of_netns("00000000", host.netns) is None  # another server's
    # Interface names inside the namespaces are fixed and short (IFNAMSIZ is 16 with the NUL).
    assert len("eth0") <= 15 and len("veth0") <= 15
    for bad in ("", "../x", "a" * 129, "has space", "-leading"):
        with pytest.raises(DriverError, match="invalid sandbox id"):
            names.check_sandbox_id(bad)


def test_cgroup_v1_mount_parsing_handles_shared_hierarchies() -> None:
    mountinfo = (
        "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
        "31 25 0:27 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n"
        "32 25 0:28 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
        "33 25 0:29 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n"
        "34 25 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )
    mounts = _v1_mounts(mountinfo)
    assert mounts["cpu"] == mounts["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert set(mounts) == {"cpu", "cpuacct", "memory", "pids", "freezer"}


def test_memory_gate_refuses_with_the_numbers() -> None:
    total_mib = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    MemoryGate(reserve_mib=0).check("start a sandbox", 1, 512)  # plenty
    with pytest.raises(DriverError, match=r"MiB available, \d+ MiB kept in reserve"):
        MemoryGate(reserve_mib=total_mib).check("start a sandbox", 1, 512)
