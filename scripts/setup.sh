#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: system packages, .venv, the project.
# Safe to run again; it only installs what is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

apt_packages=(fuse3 libfuse3-dev pkg-config qemu-utils qemu-system-common fio python3-venv gcc
              qemu-system-x86 busybox-static ceph-mon ceph-osd radosgw ceph-common)
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

# The guest kernel of tests/test_vm.py: Debian's cloud kernel (made for VMs, a third of
# the size of linux-image-amd64), only vmlinuz and the virtio modules, unpacked from the
# package without installing it (no initramfs hooks, nothing under /boot).
guest=.venv/guest-kernel
fetch_guest_kernel() {  # into $1; the newest cloud kernel the package lists name
    local kernel
    kernel=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
    [ -n "$kernel" ] && (cd "$1" && apt-get download "$kernel") &&
    dpkg-deb --fsys-tarfile "$1"/*.deb | tar -x -C "$1" --wildcards './boot/vmlinuz-*' \
        './lib/modules/*/kernel/drivers/virtio/*.ko' './lib/modules/*/kernel/drivers/block/virtio_blk.ko' &&
    mkdir "$1/k" && mv "$1"/boot/vmlinuz-* "$1"/lib/modules/*/kernel/drivers/virtio/*.ko \
        "$1"/lib/modules/*/kernel/drivers/block/virtio_blk.ko "$1/k/"
}
if ! compgen -G "$guest/vmlinuz-*" >/dev/null; then
    dl=$(mktemp -d)
    if ! fetch_guest_kernel "$dl" >"$dl.log" 2>&1; then  # stale package lists: update once
        rm -rf "$dl" && mkdir "$dl"
        sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
        if ! { $sudo apt-get update -qq && fetch_guest_kernel "$dl"; } >"$dl.log" 2>&1; then
            cat "$dl.log"; rm -rf "$dl" "$dl.log"; exit 1
        fi
    fi
    rm -rf "$guest" && mv "$dl/k" "$guest" && rm -rf "$dl" "$dl.log"
fi
log=$(mktemp)
if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[test]'; } >"$log" 2>&1
then
    cat "$log"; rm -f "$log"; exit 1
fi
rm -f "$log"
echo "cowfs set up: $(.venv/bin/cowfs --version)"
