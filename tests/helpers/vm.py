"""A tiny Linux guest under QEMU, for the tests that put a real VM on a cowfs mount.

The guest is Debian's cloud kernel (scripts/setup.sh unpacks it and its virtio modules
into .venv/guest-kernel) with an initramfs built here: busybox-static, the modules, and
the test's own /init (GUEST_PRELUDE, then whatever the test has the guest do). The
guest logs through /dev/kmsg as `cowfs-vm: ...`; printk prints on the serial console
synchronously, and QEMU sends the console to a file that `Guest` reads.

The guest runs under TCG unless COWFS_TEST_ACCEL names another accelerator. KVM is not
assumed: CI machines may have no /dev/kvm, and where this was written /dev/kvm opens
(nested) but a KVM guest never gets to print a byte.
"""

import contextlib
import io
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.mounting import TIMEOUT, wait_until

ROOT = next(d for d in Path(__file__).resolve().parents if (d / "pyproject.toml").is_file())
GUEST_KERNEL = ROOT / ".venv" / "guest-kernel"
"""Where scripts/setup.sh unpacks vmlinuz and the virtio modules of Debian's cloud kernel."""
MODULES = "virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk"
"""The guest's modules, in dependency order (each .ko's .modinfo `depends=`)."""
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
ACCEL = os.environ.get("COWFS_TEST_ACCEL", "tcg")
BOOT_S = 90.0
"""TCG boots the guest in about 3 s here; a slow CI machine gets plenty more."""
ERRORS = re.compile(r"I/O error|Buffer I/O|blk_update_request|Kernel panic|cowfs-vm: FAILED")
"""What must never reach the console: the guest saw a disk error, or its script failed."""

GUEST_PRELUDE = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mkdir -p /tmp
log() {{ echo "<5>cowfs-vm: $*" > /dev/kmsg; }}
for m in {MODULES}; do
    insmod /modules/$m.ko || log "FAILED insmod $m"
done
n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1)); [ $n -gt 1000 ] && log "FAILED no /dev/vda" && break
    sleep 0.01
done
log "ready"
"""
"""The start of every guest's /init: busybox, /dev, the virtio-blk driver, /dev/vda."""


def cpio(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """An initramfs: a cpio archive in the kernel's "newc" format. Entries are (name,
    mode, data, rdev); written by hand so that /dev/console can be a device node
    without root privileges or a cpio tool."""
    out = io.BytesIO()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF)
        out.write(b"070701" + b"".join(b"%08X" % f for f in (*fields, len(encoded), 0)))
        out.write(encoded + b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data + b"\0" * (-len(data) % 4))
    return out.getvalue()


def is_static(binary: Path) -> bool:
    """An ELF executable without a PT_INTERP program header needs no dynamic loader."""
    data = binary.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return 3 not in types  # PT_INTERP


@dataclass
class GuestFiles:
    kernel: Path
    initrd: Path


def build_guest(directory: Path, init: str, files: Iterable[tuple[str, bytes]] = ()) -> GuestFiles:
    """The guest's kernel (from scripts/setup.sh) and an initramfs in `directory` whose
    /init is `init`; `files` (name, data) go into its root too. Fails the test, naming
    what is missing, when the machine lacks QEMU, the kernel or a static busybox."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (Debian package qemu-system-x86)")
    kernels = sorted(GUEST_KERNEL.glob("vmlinuz-*"))
    if not kernels or not all((GUEST_KERNEL / f"{m}.ko").is_file() for m in MODULES.split()):
        missing.append(f"the guest kernel and its virtio modules in {GUEST_KERNEL}")
    if not BUSYBOX.is_file() or not is_static(BUSYBOX):
        missing.append(f"a static {BUSYBOX} (Debian package busybox-static)")
    if missing:
        pytest.fail(f"the VM test needs {', '.join(missing)}: run scripts/setup.sh")
    entries = [
        ("dev", stat.S_IFDIR | 0o755, b"", 0),
        ("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)),
        ("proc", stat.S_IFDIR | 0o755, b"", 0),
        ("bin", stat.S_IFDIR | 0o755, b"", 0),
        ("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes(), 0),
        ("modules", stat.S_IFDIR | 0o755, b"", 0),
        *[
            (f"modules/{m}.ko", stat.S_IFREG | 0o644, (GUEST_KERNEL / f"{m}.ko").read_bytes(), 0)
            for m in MODULES.split()
        ],
        *[(name, stat.S_IFREG | 0o644, data, 0) for name, data in files],
        ("init", stat.S_IFREG | 0o755, init.encode(), 0),
    ]
    initrd = directory / "initrd.cpio"
    initrd.write_bytes(cpio(entries))
    return GuestFiles(kernels[-1], initrd)


class Guest:
    """A running QEMU guest on `disk` (raw, virtio, cache=none: QEMU opens it O_DIRECT)
    whose serial console goes to a file the test reads."""

    def __init__(self, files: GuestFiles, disk: Path, workdir: Path) -> None:
        self.console = workdir / "console.log"
        self.qemu_log = workdir / "qemu.log"
        self._text = b""
        with open(self.qemu_log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    QEMU, "-accel", ACCEL, "-m", "256", "-smp", "1",
                    "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
                    "-no-reboot",
                    "-kernel", str(files.kernel), "-initrd", str(files.initrd),
                    "-append", "console=ttyS0 loglevel=6 printk.devkmsg=on panic=-1",
                    "-serial", f"file:{self.console}",
                    "-drive", f"file={disk},format=raw,if=virtio,cache=none",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def _read(self) -> None:
        """Take in what the console has printed since the last look."""
        with contextlib.suppress(FileNotFoundError), open(self.console, "rb") as f:
            f.seek(len(self._text))
            self._text += f.read()

    def text(self) -> str:
        self._read()
        return self._text.decode(errors="replace")

    def tail(self, lines: int = 25) -> str:
        console = "\n".join(self.text().splitlines()[-lines:])
        qemu = self.qemu_log.read_text(errors="replace").strip()
        return f"console (last {lines} lines):\n{console}\nqemu: {qemu or '(nothing)'}"

    def check(self) -> None:
        """Raise if the guest saw an error or QEMU has exited."""
        bad = ERRORS.search(self.text())
        if bad:
            raise AssertionError(f"the guest saw {bad.group(0)!r}\n{self.tail()}")
        if self.proc.poll() is not None:
            raise AssertionError(f"QEMU exited with {self.proc.returncode}\n{self.tail()}")

    def wait_for(self, pattern: re.Pattern[str], timeout: float = TIMEOUT) -> re.Match[str]:
        """The first complete console line that matches `pattern` (waiting for it)."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            self.check()
            text = self.text()
            m = pattern.search(text, 0, text.rfind("\n") + 1)
            if m is not None:
                found.append(m)
            return bool(found)

        try:
            wait_until(seen, timeout, f"the guest to print {pattern.pattern!r}")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.tail()}") from None
        return found[0]

    def stop(self) -> None:
        """QEMU's orderly exit on SIGTERM (in-flight requests complete)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(TIMEOUT)
        self._read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
