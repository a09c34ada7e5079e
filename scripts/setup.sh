#!/usr/bin/env bash
# Installs what nseh needs, idempotently: Debian packages (QEMU, nftables, conntrack,
# busybox for the guest, wrk for load) and the Python package with its pinned deps in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(qemu-system-x86 qemu-utils nftables conntrack iproute2 busybox-static cpio wrk procps iputils-ping socat)
missing=()
for pkg in "${debian_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp=.venv/.nseh-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    echo "setup: installing Python dependencies into .venv"
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
