#!/bin/sh
# The runtime tests this machine (cgroup v1) runs in CI, run on the guest's systemd cgroup v2:
#   tests/hosts/vm-smoke --script tests/hosts/runtime-tests.sh --install
# Sandboxes of both drivers: limits, freeze and thaw, snapshots, suspend and resume, the warm pool,
# adoption after a restart, crash recovery, containment. Not in .ci/run: under QEMU's emulation
# they take about half an hour.
set -eu
cd /opt/openmicrovm
.venv/bin/pip install -q --disable-pip-version-check pytest
# The tests' cache is $XDG_CACHE_HOME/openmicrovm: the service's, where the image build put the
# base root filesystem they build their app image on.
export XDG_CACHE_HOME=/var/cache
exec .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/runtime/test_sandboxes.py tests/runtime/test_process_containment.py \
    tests/runtime/test_resilience.py
