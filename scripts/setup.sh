#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: system packages, .venv, the project.
# Safe to run again; it only installs what is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

apt_packages=(fuse3 libfuse3-dev pkg-config qemu-utils qemu-system-common fio python3-venv gcc)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
log=$(mktemp)
if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[test]'; } >"$log" 2>&1
then
    cat "$log"; rm -f "$log"; exit 1
fi
rm -f "$log"
echo "cowfs set up: $(.venv/bin/cowfs --version)"
