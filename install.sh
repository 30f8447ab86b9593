#!/bin/sh
# Installs everything openmicrovm needs on Debian 12 or 13, as root: the system packages of the
# sandbox drivers and the image builder, the pinned gVisor (runsc), and a Python virtual
# environment in .venv with the project in it. It prints what it will change before changing it.
#   ./install.sh                      what the server needs
#   ./install.sh --dev                also what the tests need (pytest, moto, the AWS CLI, ruff,
#                                     PostgreSQL, kubectl, Chromium and Playwright for the console)
#   ./install.sh --plan [--dev]       print what it would change on this host; change nothing
#   ./install.sh --uninstall          remove what install.sh added (add --plan to see it first);
#                                     --purge also removes the server's data and cache dirs
# Tests point OPENMICROVM_OS_RELEASE (default /etc/os-release), OPENMICROVM_INSTALL_STATE
# (default /var/lib/openmicrovm-install) and OPENMICROVM_APT_ETC (default /etc/apt) elsewhere.
set -eu
cd "$(dirname "$0")"
here=$(pwd)

usage() {
    echo "usage: $0 [--dev] [--plan]    or    $0 --uninstall [--purge] [--plan]"
}
say() { echo "install.sh: $*"; }
fail() {
    echo "install.sh: $*" >&2
    exit 1
}

dev="" plan="" uninstall="" purge=""
for arg in "$@"; do
    case "$arg" in
        --dev) dev=1 ;;
        --plan) plan=1 ;;
        --uninstall) uninstall=1 ;;
        --purge) purge=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
if { [ -n "$purge" ] && [ -z "$uninstall" ]; } || { [ -n "$dev" ] && [ -n "$uninstall" ]; }; then
    usage >&2
    exit 2
fi

os_release=${OPENMICROVM_OS_RELEASE:-/etc/os-release}
state=${OPENMICROVM_INSTALL_STATE:-/var/lib/openmicrovm-install}
venv=$here/.venv
apt_etc=${OPENMICROVM_APT_ETC:-/etc/apt}
apt_source=$apt_etc/sources.list.d/openmicrovm-trixie.sources
apt_pin=$apt_etc/preferences.d/openmicrovm-trixie
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
# The gVisor release the gvisor driver is pinned to: keep in step with VERSION_PREFIX in
# openmicrovm/runtime/runsc_install.py (tests/install checks that they agree).
runsc_pin=0.0~20240729

# The server's data and cache dirs as its settings say, once the venv can tell; before that, the
# built-in defaults (the same ones, unless a settings file or OPENMICROVM_* variable moves them).
server_dirs() {
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c '
from openmicrovm.config import load_settings
settings = load_settings()
print(settings.data_dir)
print(settings.cache_dir)' 2>/dev/null; then
        return
    fi
    # HOME is unset where no login made it (a systemd unit, cloud-init): Python then asks passwd.
    home=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
    echo "${OPENMICROVM_DATA_DIR:-${XDG_DATA_HOME:-$home/.local/share}/openmicrovm}"
    echo "${OPENMICROVM_CACHE_DIR:-${XDG_CACHE_HOME:-$home/.cache}/openmicrovm}"
}

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"
}

# ------------------------------------------------------------------------------ uninstall

if [ -n "$uninstall" ]; then
    if [ -z "$plan" ] && [ "$(id -u)" != 0 ]; then
        fail "run as root: uninstalling removes packages and files under /etc/apt"
    fi
    dirs=$(server_dirs)
    data_dir=$(echo "$dirs" | sed -n 1p)
    cache_dir=$(echo "$dirs" | sed -n 2p)
    recorded=""
    [ -r "$state/packages" ] && recorded=$(sort -u "$state/packages" | tr '\n' ' ')
    # A recorded package goes only if removing it takes nothing else with it: a package that the
    # admin installed since may depend on it, and install.sh never removes what it did not add.
    removable="" kept=""
    for package in $recorded; do
        is_installed "$package" || continue
        if ! simulated=$(apt-get -s remove "$package" 2>&1); then
            kept="$kept
      $package (apt would not remove it: $(echo "$simulated" | grep '^E:' | head -n 1))"
            continue
        fi
        others=$(echo "$simulated" | awk '/^Remv /{print $2}' | while read -r name; do
            case " $recorded " in *" $name "*) ;; *) echo "$name" ;; esac
        done | tr '\n' ' ')
        if [ -z "$others" ]; then
            removable="$removable $package"
        else
            kept="$kept
      $package (needed by ${others% })"
        fi
    done
    runsc_dirs=""
    if [ -r "$state/runsc" ]; then
        while read -r entry; do
            # Only what runsc_install put there: it leaves a source.json beside the binary.
            [ -f "$entry/source.json" ] && runsc_dirs="$runsc_dirs $entry"
        done <"$state/runsc"
    fi
    console_assets=""
    # Only what vendor_install put there: each package's directory holds its pin.json.
    for marker in "$cache_dir"/console/vendor/*/pin.json; do
        [ -f "$marker" ] && console_assets="$console_assets ${marker%/pin.json}"
    done

    say "--uninstall removes from this host:"
    for file in "$apt_source" "$apt_pin"; do
        [ -e "$file" ] && echo "  - $file (install.sh's trixie source and its pin)"
    done
    for entry in $runsc_dirs; do echo "  - $entry (the runsc install.sh fetched)"; done
    for entry in $console_assets; do echo "  - $entry (a web console asset install.sh fetched)"; done
    [ -e "$venv" ] && echo "  - $venv (the Python environment)"
    [ -n "$removable" ] && echo "  - the Debian packages install.sh installed:$removable (apt-get remove)"
    [ -d "$state" ] && echo "  - $state (install.sh's record of what it added)"
    [ -n "$purge" ] && echo "  - --purge: $data_dir and $cache_dir (every image, MicroVM, snapshot and log)"
    say "it keeps:"
    echo "  - packages that were there before install.sh, and what they pulled in (apt-get autoremove removes those when you wish)"
    [ -n "$kept" ] && echo "  - packages install.sh installed that it must not remove:$kept"
    [ -z "$purge" ] && echo "  - the data dir $data_dir and the cache dir $cache_dir (./install.sh --uninstall --purge removes them; snapshots in them restore only with the runsc that made them, which ./install.sh brings back)"
    if [ -n "$plan" ]; then
        say "--plan: nothing was changed"
        exit 0
    fi

    if [ -n "$purge" ] && [ -x "$venv/bin/openmicrovm" ]; then
        # Sandboxes outlive the server on purpose: stop them before their files go. cleanup
        # refuses while a server holds the data dir, and then nothing is removed.
        "$venv/bin/openmicrovm" cleanup || fail "cannot stop the data dir's sandboxes (is the server still running? stop it and run this again); nothing was removed"
    fi
    rm -f "$apt_source" "$apt_pin"
    for entry in $runsc_dirs; do rm -rf "$entry"; done
    for entry in $console_assets; do rm -rf "$entry"; done
    rm -rf "$venv"
    if [ -n "$removable" ]; then
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq $removable >/dev/null
    fi
    [ -n "$purge" ] && rm -rf "$data_dir" "$cache_dir"
    rm -rf "$state"
    say "uninstalled; apt forgets the trixie index at its next apt-get update"
    exit 0
fi

# ------------------------------------------------------------------------------ which system

case "$os_release" in */*) ;; *) os_release=./$os_release ;; esac
[ -r "$os_release" ] || fail "cannot read $os_release to tell which system this is; install.sh supports Debian 12 (bookworm) and Debian 13 (trixie)"
# os-release is shell variable assignments by specification; read it in a subshell so that its
# names (ID, VERSION, ...) cannot clash with ours.
# shellcheck source=/dev/null
os_id=$(. "$os_release" && echo "${ID:-}")
# shellcheck source=/dev/null
os_version=$(. "$os_release" && echo "${VERSION_ID:-}")
# shellcheck source=/dev/null
os_name=$(. "$os_release" && echo "${PRETTY_NAME:-${NAME:-$os_id $os_version}}")
case "$os_id:$os_version" in
    debian:12) codename=bookworm ;;
    debian:13) codename=trixie ;;
    ubuntu:24.04)
        fail "Ubuntu 24.04 is not supported. Its archive has no runsc (gVisor), so MicroVMs would fall back to the weaker process driver, and the image builder makes its Debian bookworm base with debootstrap from a Debian mirror. Use Debian 12 or 13 (a virtual machine will do)."
        ;;
    *)
        fail "$os_name is not supported: install.sh supports Debian 12 (bookworm) and Debian 13 (trixie). On another system, install the equivalents of the packages named in install.sh and gVisor's runsc by hand, then: python3 -m venv .venv && .venv/bin/pip install -e ."
        ;;
esac
if [ -z "$plan" ] && [ "$(id -u)" != 0 ]; then
    fail "run as root; sandboxes need network namespaces, cgroups and mounts (./install.sh --plan shows what it would change, as any user)"
fi

# ------------------------------------------------------------------------------ the plan

packages="python3 python3-venv python3-dev gcc libc6-dev runsc buildah bubblewrap debootstrap \
iproute2 util-linux procps nftables ca-certificates curl"
if [ -n "$dev" ]; then
    # The tests run their servers on SQLite and on a PostgreSQL cluster of their own, which they
    # start from this package's programs (tests/support/postgres.py); the server needs no local one.
    packages="$packages postgresql"
    # tests/deploy reads deploy/kubernetes/ with kubectl: Debian's is kubernetes-client. Any kubectl
    # already on PATH does (another package's /usr/bin/kubectl would clash with Debian's).
    command -v kubectl >/dev/null 2>&1 || packages="$packages kubernetes-client"
    # tests/console drive the web console in Debian's headless Chromium (Playwright from PyPI).
    packages="$packages chromium"
fi
missing=""
for package in $packages; do
    is_installed "$package" || missing="$missing $package"
done

# apt's Packages targets as "codename repo-uri sources-entry": from the downloaded Release files,
# else (before the first apt-get update) as the sources name their suites. The $(...) in single
# quotes are apt's own placeholders.
# shellcheck disable=SC2016
apt_targets() {
    targets=$(apt-get indextargets --format '$(TARGET_OF) $(IDENTIFIER) $(CODENAME) $(REPO_URI) $(SOURCESENTRY)' 2>/dev/null |
        awk '$1 == "deb" && $2 == "Packages" {print $3, $4, $5}')
    [ -n "$targets" ] || targets=$(apt-get indextargets --no-release-info --format '$(TARGET_OF) $(IDENTIFIER) $(RELEASE) $(REPO_URI) $(SOURCESENTRY)' 2>/dev/null |
        awk '$1 == "deb" && $2 == "Packages" {print $3, $4, $5}')
    echo "$targets"
}

trixie_source="" own_trixie=""
if [ "$codename" = bookworm ]; then
    targets=$(apt_targets)
    # A trixie source the admin set up already serves; install.sh then adds neither source nor
    # pin, as a pin of its own would overrule whatever the admin meant that source for.
    own_trixie=$(echo "$targets" | awk -v ours="$apt_source" '$1 == "trixie" && index($3, ours ":") != 1 {print $3; exit}')
    if [ -z "$own_trixie" ]; then
        # The same mirror (or proxy) that the host's bookworm comes from carries trixie too.
        mirror=${OPENMICROVM_DEBIAN_MIRROR:-$(echo "$targets" | awk '$1 == "bookworm" {print $2; exit}')}
        mirror=${mirror%/}
        [ -n "$mirror" ] || fail "apt has no source for Debian bookworm (apt-get indextargets lists none), so install.sh cannot tell which mirror to take trixie's runsc from: add the host's Debian source (see sources.list(5)), run apt-get update, and run install.sh again; or name the mirror in OPENMICROVM_DEBIAN_MIRROR"
        trixie_source="# Added by openmicrovm's install.sh for one package, gVisor's runsc (apt-get download runsc=$runsc_pin...).
# $apt_pin keeps every trixie package from being installed or upgraded by itself.
# ./install.sh --uninstall removes both files; remove them before upgrading this host to Debian 13
# (install.sh run on Debian 13 does), as the pin would hold back the whole new release.
Types: deb
URIs: $mirror
Suites: trixie
Components: main
Signed-By: $keyring"
    fi
fi
trixie_pin="Explanation: openmicrovm's install.sh: trixie only lends runsc to apt-get download; never install or upgrade from it
Package: *
Pin: release o=Debian,n=trixie
Pin-Priority: -1"

dirs=$(server_dirs)
cache_dir=$(echo "$dirs" | sed -n 2p)
say "on this host ($os_name) install.sh will:"
if [ -n "$missing" ]; then
    echo "  - install Debian packages (apt-get install --no-install-recommends):$missing"
else
    echo "  - install no Debian package: all it needs is there ($packages)"
fi
if [ -n "$trixie_source" ]; then
    verb=add
    [ -e "$apt_source" ] && verb=rewrite
    echo "  - $verb $apt_source, a Debian trixie source on the host's mirror $mirror, signed by $keyring:"
    echo "$trixie_source" | sed -n '/^[^#]/s/^/      /p'
    echo "  - $verb $apt_pin, which pins every trixie package at -1 so that apt never installs or upgrades one by itself:"
    echo "$trixie_pin" | sed 's/^/      /'
fi
if [ "$codename" = bookworm ]; then
    [ -n "$own_trixie" ] && echo "  - add no apt source: apt already has trixie ($own_trixie)"
    cached=""
    for binary in "$cache_dir/runsc/$runsc_pin".*/runsc; do
        [ -x "$binary" ] && cached=$binary
    done
    if [ -n "$cached" ]; then
        echo "  - fetch no runsc: $cached is the pinned $runsc_pin already"
    else
        [ -n "$trixie_source" ] && echo "  - refresh apt's index of that source only (apt-get update of $apt_source)"
        echo "  - fetch runsc $runsc_pin with apt-get download and put its binary in $cache_dir/runsc/$runsc_pin.../"
    fi
    echo "    (bookworm's /usr/bin/runsc stays: snapshots made with it restore only with it)"
else
    echo "  - use Debian 13's own runsc ($runsc_pin, from the runsc package): nothing to fetch"
    # Left from when this host was Debian 12: on trixie itself, that pin would hold back every package.
    for file in "$apt_source" "$apt_pin"; do
        [ -e "$file" ] && echo "  - remove $file, which install.sh added on Debian 12 (on Debian 13 it would pin the system's own release)"
    done
fi
if [ -x "$venv/bin/python" ]; then
    echo "  - update the Python environment $venv (pip install -e .${dev:+[dev]})"
else
    echo "  - create the Python environment $venv (python3 -m venv; pip install -e .${dev:+[dev]})"
fi
echo "  - fetch the web console's xterm.js (pinned, sha512-checked) from the npm registry into $cache_dir/console/vendor/"
echo "  - record what it added in $state, for ./install.sh --uninstall"
if [ -n "$plan" ]; then
    say "--plan: nothing was changed"
    exit 0
fi

# ------------------------------------------------------------------------------ the changes

mkdir -p "$state"
# Before any apt-get install, so that apt installs the packages below from the system's own
# release: on Debian 13 no pin of ours is left; on Debian 12 the pin is in place before the trixie
# source is (a source of ours left without its pin, by hand or by a copied /etc/apt, would
# otherwise upgrade the whole system to trixie).
[ "$codename" = trixie ] && rm -f "$apt_source" "$apt_pin"
if [ -n "$trixie_source" ]; then
    echo "$trixie_pin" >"$apt_pin.tmp" && mv "$apt_pin.tmp" "$apt_pin"
    echo "$trixie_source" >"$apt_source.tmp" && mv "$apt_source.tmp" "$apt_source"
fi
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
    # Recorded only now that apt has installed them: these, and no others, are install.sh's.
    for package in $missing; do echo "$package"; done >>"$state/packages"
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -e ".${dev:+[dev]}"
# Refreshes the trixie source, downloads and unpacks the pinned runsc; when it cannot, it says why
# and the driver keeps /usr/bin/runsc (or, with no runsc at all, the server uses the process driver).
"$venv/bin/python" -m openmicrovm.runtime.runsc_install --record "$state/runsc" --apt-source "$apt_source"
# The web console's terminal (xterm.js): pinned npm releases, checked against their sha512, into the
# cache dir; never fetched from a CDN at run time.
"$venv/bin/python" -m openmicrovm.console.vendor_install
say "ready; the server is .venv/bin/openmicrovm (./install.sh --uninstall removes what install.sh added)"
