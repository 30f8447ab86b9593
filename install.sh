#!/bin/sh
# Installs everything openmicrovm needs on Debian 12, as root: the system packages of the sandbox
# drivers and the image builder, and a Python virtual environment in .venv with the project in it.
#   ./install.sh          what the server needs
#   ./install.sh --dev    also what the tests need (pytest, moto, the AWS CLI, ruff, PostgreSQL, kubectl)
set -eu
cd "$(dirname "$0")"

extras=""
case "${1:-}" in
    --dev) extras="[dev]" ;;
    "") ;;
    *) echo "usage: $0 [--dev]" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root; sandboxes need network namespaces, cgroups and mounts" >&2
    exit 1
fi

packages="python3 python3-venv python3-dev gcc libc6-dev runsc buildah bubblewrap debootstrap \
iproute2 util-linux procps nftables ca-certificates curl"
if [ "$extras" = "[dev]" ]; then
    # The tests run their servers on SQLite and on a PostgreSQL cluster of their own, which they
    # start from this package's programs (tests/support/postgres.py); the server needs no local one.
    packages="$packages postgresql"
    # tests/deploy reads deploy/kubernetes/ with kubectl: Debian's is kubernetes-client. Any kubectl
    # already on PATH does (another package's /usr/bin/kubectl would clash with Debian's).
    command -v kubectl >/dev/null 2>&1 || packages="$packages kubernetes-client"
fi
missing=""
for package in $packages; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing="$missing $package"
done
if [ -n "$missing" ]; then
    echo "install.sh: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".$extras"
# A newer gVisor than bookworm's (snapshots of asyncio apps, faster restores), from Debian trixie,
# signature-checked and cached; the driver falls back to /usr/bin/runsc when it cannot be fetched.
.venv/bin/python -m openmicrovm.runtime.runsc_install
echo "install.sh: ready; the server is .venv/bin/openmicrovm"
