"""A real VM on a long-lived cowfs mount: a QEMU guest writes its disk through two backups.

Why: cowfs exists to back up the disk of a VM that keeps running, and the other tests
stand in for the VM with dd, fio, qemu-io and Python. Only a real guest drives the live
file the way a VM does: QEMU opens it with O_DIRECT (`cache=none`) and takes its own
image locks on it, and the guest kernel's virtio-blk driver waits for each request while
QEMU serves it from its own threads. Here a tiny Linux guest (Debian's cloud kernel,
which scripts/setup.sh unpacks into .venv/guest-kernel, and an initramfs of
busybox-static built once a session) boots from `cowfs mount vda.img MP` (a mount with
no job) and writes /dev/vda without pause while `cowfs backup --wait` takes a full
backup that anchors the bitmap `nightly`, then an incremental on top of it. Each backup
starts with a slow copier; the test waits until a guest write has needed a
copy-before-write and the guest has written dozens more blocks while the job ran, then
lifts the limit (`cowfs set-speed`) and requires exit 0. The guest must not notice: it
keeps writing during and after both backups, and no I/O error reaches its console.

The guest makes the restored bytes tell their own story. Write number `seq` (1, 2, ...)
goes, with O_DIRECT, to one 4 KiB block, which it fills with "seq, block" repeated: an
even write to the next slot of a permutation of the disk's 64 KiB clusters (consecutive
ones land far apart, ahead of and behind the copier), an odd one back to the block of
the write ECHO before it (a cluster that is dirty while an incremental copies). After
each write has returned the guest logs `cowfs-vm: wrote SEQ` through /dev/kmsg; printk
prints on the serial console synchronously, so that line is in the host's console file
before the guest issues the next write. For each link, restored with `qemu-img convert`,
and for the source after the guest stopped, the test finds the newest write the image
holds, P, and requires the image to be byte for byte the disk after exactly the writes
1..P (a point in time: every block holds its original content or the newest of those
writes; no write lost, torn or from later), with P no earlier than the last write the
console showed before `cowfs backup` started and no later than one past the last it
showed when the command returned. Both links are clean for `qemu-img check`, and the
incremental holds exactly the clusters written between the two points in time; the rest
reads through to the full.

While the guest runs, QEMU's locks are checked both ways: qemu-io and a second QEMU
opening the source image itself read-write fail with QEMU's `Failed to get "write"
lock` (cowfs holds QEMU's lock bytes on it), and so does qemu-io opening the live file,
which the guest's QEMU holds.

The guest runs under TCG unless COWFS_TEST_ACCEL names another accelerator. KVM is not
assumed: CI machines may have no /dev/kvm, and where this was written /dev/kvm opens
(nested) but a KVM guest never gets to print a byte. Under TCG on 2 cores the guest
boots in about 3 s, writes some 80 blocks a second through the mount, and the test takes
about 10 s. Everything it starts (QEMU, `cowfs backup --wait`, the cowfs daemon, the
mount) is torn down by a fixture, even when the test fails.
"""

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import make_image
from helpers.mounting import (
    COWFS,
    TIMEOUT,
    UNMOUNT,
    Mounted,
    cowfs_mounts,
    run_cowfs,
    unmount_released,
    wait_until,
)
from helpers.vm import ACCEL, BOOT_S, ERRORS, GUEST_PRELUDE, QEMU, GuestFiles, build_guest
from helpers.vm import Guest as VmGuest

KiB, MiB = 1 << 10, 1 << 20
SIZE = 32 * MiB
BLOCK = 4 * KiB
CLUSTER = 64 * KiB
SLOTS = SIZE // CLUSTER
"""One written block per cluster: every write dirties (and may need a copy of) its own."""
STRIDE = 197
"""Odd, so the even writes visit every slot once per 2 * SLOTS writes; consecutive ones
land about 24 MiB apart, ahead of and behind the copier."""
ECHO = 101
"""Each odd write (past the first ECHO) rewrites the block of the write ECHO before it: a
cluster written recently, so dirty in the bitmap while an incremental copies."""
RECORD = "COWFSVM seq=%010d blk=%06d "
RECORD_LEN = 64
SLOW = "256K"
"""The copier's limit while the test watches the guest race it (2 min for the whole disk:
the job surely runs on); lifted with `cowfs set-speed` once the race has been seen."""
MORE = 40
"""Writes the guest must add between the steps (a real condition to wait on)."""
WROTE = re.compile(rb"cowfs-vm: wrote (\d+)\r?\n")


# -- the guest's writes, as the guest does them and as the test checks them --------------


def block_of(seq: int) -> int:
    """The 4 KiB block that write `seq` overwrites: an even write goes to slot
    `seq * STRIDE % SLOTS`, an odd one rewrites the block of write `seq - ECHO`; the
    block lies at an offset inside the slot's cluster that varies from slot to slot."""
    base = seq - ECHO if seq % 2 and seq > ECHO else seq
    slot = base * STRIDE % SLOTS
    return slot * (CLUSTER // BLOCK) + slot % (CLUSTER // BLOCK)


def _record(seq: int, blk: int) -> bytes:
    text = (RECORD % (seq, blk)).ljust(RECORD_LEN, ".")
    assert len(text) == RECORD_LEN
    return text.encode()


def block_content(seq: int) -> bytes:
    """What write `seq` puts in its block: its record, repeated over the whole block."""
    return _record(seq, block_of(seq)) * (BLOCK // RECORD_LEN)


def state_after(original: bytes, writes: int) -> bytes:
    """The disk after exactly the writes 1..`writes` (the newest write of each block wins)."""
    disk = bytearray(original)
    for seq in range(1, writes + 1):
        blk = block_of(seq)
        disk[blk * BLOCK : (blk + 1) * BLOCK] = block_content(seq)
    return bytes(disk)


def newest_write(image: bytes) -> int:
    """The highest write number any written block of `image` carries (0: none)."""
    newest = 0
    for slot in range(SLOTS):
        blk = slot * (CLUSTER // BLOCK) + slot % (CLUSTER // BLOCK)
        head = image[blk * BLOCK : blk * BLOCK + RECORD_LEN]
        if head.startswith(b"COWFSVM seq="):
            newest = max(newest, int(head[12:22]))
    return newest


def assert_point_in_time(image: bytes, original: bytes, low: int, high: int, what: str) -> int:
    """`image` is the disk after exactly the writes 1..P for some P in [low, high]: every
    block holds its original content or the newest of those writes, and nothing else.
    Returns P."""
    assert len(image) == SIZE, f"{what}: {len(image)} bytes, not {SIZE}"
    p = newest_write(image)
    expected = state_after(original, p)
    if image != expected:

        def block(data: bytes, b: int) -> bytes:
            return data[b * BLOCK : (b + 1) * BLOCK]

        bad = [b for b in range(SIZE // BLOCK) if block(image, b) != block(expected, b)]
        heads = {b: image[b * BLOCK : b * BLOCK + 34] for b in bad[:5]}
        raise AssertionError(
            f"{what} is not the disk after writes 1..{p}: {len(bad)} blocks differ, "
            f"first {bad[:5]} hold {heads}"
        )
    assert low <= p <= high, f"{what} holds writes 1..{p}, expected a point within {low}..{high}"
    return p


# -- the guest -------------------------------------------------------------------------

INIT = (
    GUEST_PRELUDE
    + f"""# The guest writes /dev/vda in a loop, one O_DIRECT block at a time.
seq=0
while :; do
    seq=$((seq + 1))
    base=$seq
    [ $((seq % 2)) -eq 1 ] && [ $seq -gt {ECHO} ] && base=$((seq - {ECHO}))
    slot=$((base * {STRIDE} % {SLOTS}))
    blk=$((slot * {CLUSTER // BLOCK} + slot % {CLUSTER // BLOCK}))
    r=$(printf '{RECORD}' $seq $blk)
    while [ ${{#r}} -lt {RECORD_LEN} ]; do r="$r."; done
    r="$r$r"; r="$r$r"; r="$r$r"; r="$r$r"; r="$r$r"; r="$r$r"
    if ! printf '%s' "$r" | dd of=/dev/vda bs={BLOCK} seek=$blk count=1 conv=notrunc \\
            iflag=fullblock oflag=direct 2>/tmp/err; then
        log "FAILED write $seq: $(cat /tmp/err)"
        break
    fi
    log "wrote $seq"
done
while :; do sleep 3600; done
"""
)
assert (BLOCK // RECORD_LEN) == 1 << 6  # the six doublings above


@pytest.fixture(scope="session")
def guest_files(tmp_path_factory: pytest.TempPathFactory) -> GuestFiles:
    """The guest's kernel (from scripts/setup.sh) and its initramfs, built once a session."""
    return build_guest(tmp_path_factory.mktemp("vm-guest"), INIT)


class Guest(VmGuest):
    """The writing guest: follows the console's `cowfs-vm: wrote SEQ` lines."""

    def __init__(self, files: GuestFiles, disk: Path, workdir: Path) -> None:
        self._seen = 0
        self._parsed = 0
        super().__init__(files, disk, workdir)

    def _read(self) -> None:
        super()._read()
        end = self._text.rfind(b"\n") + 1  # complete lines only
        for m in WROTE.finditer(self._text, self._parsed, end):
            self._seen = max(self._seen, int(m.group(1)))
        self._parsed = max(self._parsed, end)

    def wrote(self) -> int:
        """The newest write the guest has reported done; raises if anything went wrong."""
        self.check()
        return self._seen

    def wait_wrote(self, seq: int, timeout: float = TIMEOUT) -> int:
        try:
            wait_until(lambda: self.wrote() >= seq, timeout, f"the guest to write block {seq}")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.tail()}") from None
        return self.wrote()

    def stop(self) -> int:  # type: ignore[override]
        """QEMU's orderly exit on SIGTERM (in-flight requests complete); the last write
        the console reported."""
        super().stop()
        return self._seen


# -- the mount -------------------------------------------------------------------------


STOP_VM = ((UNMOUNT, 0.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0))
"""The mount once its guest is gone: unmounted, then SIGTERM (it cancels a job still
copying; the daemon then exits), then SIGKILL."""


@dataclass
class VmRun:
    workdir: Path
    mountpoint: Path
    daemon: Mounted | None = None
    guests: list[Guest] = field(default_factory=list)
    commands: list[subprocess.Popen] = field(default_factory=list)

    def mount(self, *images: Path) -> None:
        self.mountpoint.mkdir()
        self.daemon = Mounted(images, self.mountpoint, stop=STOP_VM)
        self.daemon.start()
        assert self.daemon.is_mounted()

    def backup(self, guest: Guest, *args: str | os.PathLike) -> tuple[int, int]:
        """`cowfs backup MOUNTPOINT ARGS --wait` while the guest writes. The copier starts
        slow; once a guest write has needed a copy-before-write and the guest has written
        MORE blocks since the command started, its limit is lifted and the job must end
        complete. Returns the newest write the console showed before the command started
        and after it returned."""
        before = guest.wrote()
        command = [*COWFS, "backup", str(self.mountpoint), *map(str, args), "--wait"]
        proc = subprocess.Popen(
            [*command, "--speed", SLOW], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.commands.append(proc)

        def raced() -> bool:
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"backup {args} ended early ({proc.returncode}): {out}{err}")
            st = run_cowfs("status", self.mountpoint, "--json", check=True)
            jobs = [j for j in json.loads(st.stdout)["jobs"] if j["state"] == "running"]
            return bool(jobs) and jobs[0]["bytes_cbw"] > 0 and guest.wrote() >= before + MORE

        wait_until(raced, TIMEOUT, "a guest write to wait for a copy-before-write")
        result = run_cowfs("set-speed", self.mountpoint, "0")
        assert result.returncode == 0, ("set-speed", result.stderr)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, ("cowfs backup", args, proc.returncode, out, err)
        return before, guest.wrote()

    def teardown(self) -> None:
        """The guest first (it holds the live file), then the mount, then the daemon."""
        for guest in self.guests:
            guest.kill()
        for proc in self.commands:  # a `cowfs backup --wait` still waiting
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=TIMEOUT)
        if self.daemon is not None:
            self.daemon.teardown()


@pytest.fixture
def vm_run(tmp_path: Path) -> Iterator[VmRun]:
    run = VmRun(tmp_path, tmp_path / "mnt")
    try:
        yield run
    finally:
        run.teardown()


def record(target: Path) -> dict:
    return json.loads(target.with_name(target.name + ".cowfs.json").read_text())


def refused_write(*command: str | os.PathLike, stdin: str = "") -> None:
    """`command` opens an image read-write and must fail on QEMU's write lock."""
    result = subprocess.run(
        [*map(str, command)], input=stdin, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode != 0, f"{command[0]} got the image read-write: {result.stdout}"
    assert 'Failed to get "write" lock' in result.stderr, result.stderr


def qemu_img(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def own_clusters(link: Path) -> set[int]:
    """The clusters a qcow2 link holds itself (depth 0 in `qemu-img map`), not its backing."""
    extents = json.loads(qemu_img("map", "--output=json", link).stdout)
    own: set[int] = set()
    for e in extents:
        if e["depth"] == 0 and e["present"]:
            own.update(range(e["start"] // CLUSTER, -(-(e["start"] + e["length"]) // CLUSTER)))
    return own


# -- the test --------------------------------------------------------------------------


def test_vm_keeps_writing_through_a_full_and_an_incremental_backup(
    guest_files: GuestFiles, vm_run: VmRun, tmp_path: Path
) -> None:
    source = make_image(tmp_path / "vda.img", SIZE, seed=2026)
    original = source.read_bytes()
    full, inc = tmp_path / "full.qcow2", tmp_path / "inc.qcow2"
    vm_run.mount(source)
    live = vm_run.mountpoint / source.name

    guest = Guest(guest_files, live, tmp_path)
    vm_run.guests.append(guest)
    guest.wait_wrote(MORE, BOOT_S)

    before_full, after_full = vm_run.backup(guest, "--target", full, "--bitmap", "nightly")

    # QEMU's locks, both ways, while the guest runs on the mount.
    write = ["-c", "write -P 0x11 0 4k"]
    refused_write("qemu-io", "-f", "raw", *write, source)
    refused_write(
        QEMU, "-accel", ACCEL, "-nodefaults", "-no-user-config", "-display", "none", "-S",
        "-monitor", "stdio", "-drive", f"file={source},format=raw,if=virtio",
        stdin="quit\n",
    )  # fmt: skip
    refused_write("qemu-io", "-f", "raw", *write, live)

    guest.wait_wrote(after_full + MORE)
    before_inc, after_inc = vm_run.backup(
        guest, "--sync", "incremental", "--bitmap", "nightly", "--backing", full, "--target", inc
    )

    guest.wait_wrote(after_inc + MORE)  # still running and writing after both backups
    last = guest.stop()
    assert not ERRORS.search(guest.text()), guest.tail()

    # The live file is closed once QEMU has exited, but the kernel sends FUSE's RELEASE
    # asynchronously: `unmount` may say busy (exit 2) for a moment.
    result = unmount_released(vm_run.mountpoint)
    assert result.returncode == 0, result.stderr
    assert str(vm_run.mountpoint) not in cowfs_mounts()
    assert vm_run.daemon is not None
    vm_run.daemon.wait_exit(20)

    # The source: every write the guest made and nothing else (the write in flight at
    # SIGTERM completes without its console line).
    assert_point_in_time(source.read_bytes(), original, last, last + 1, "the source")
    for link in (full, inc):
        qemu_img("check", link)
        assert record(link)["status"] == "complete", record(link)
    assert run_cowfs("info", inc).returncode == 0  # the whole chain is complete
    points = []
    for link, low, high in ((full, before_full, after_full + 1), (inc, before_inc, after_inc + 1)):
        raw = tmp_path / f"{link.stem}.raw"
        qemu_img("convert", "-O", "raw", link, raw)
        points.append(assert_point_in_time(raw.read_bytes(), original, low, high, link.name))
    p_full, p_inc = points
    assert p_full < p_inc, f"the incremental holds no write after the full: {points}"
    # The incremental holds exactly the clusters written between the two points in time
    # (the bitmap `nightly`); every other cluster reads through to the full.
    dirty = {block_of(seq) * BLOCK // CLUSTER for seq in range(p_full + 1, p_inc + 1)}
    assert own_clusters(inc) == dirty, (
        sorted(own_clusters(inc) - dirty),
        sorted(dirty - own_clusters(inc)),
    )
