#!/usr/bin/env bash
# A real backup, end to end: set up, make a disk image, mount it through cowfs, write to the
# live file while the copier runs, finish, and check the backup against the point in time.
# Then a mount that outlives its jobs: a full and an incremental backup by command while
# it keeps serving, the chain checked against the live image. Then verify, restore and an
# instant restore of that chain. Last, a deduplicating repository on a throwaway radosgw.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
cowfs="$root/.venv/bin/cowfs"

work=$(mktemp -d /var/tmp/cowfs-demo.XXXXXX)
mkdir "$work/mnt"
cleanup() {
    if grep -q " $work/mnt fuse.cowfs " /proc/mounts; then fusermount3 -u -z "$work/mnt"; fi
    "$root/scripts/radosgw.sh" stop "$work/rgw" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

echo "== a 512 MiB disk image: random data, zeros and holes"
truncate -s 512M disk.img
for i in $(seq 0 7 500); do
    dd if=/dev/urandom of=disk.img bs=1M count=3 seek="$i" conv=notrunc status=none
done
cp --sparse=always disk.img pristine.img   # the point in time, kept only to verify

echo "== cowfs mount (the point in time is fixed when this returns)"
"$cowfs" mount disk.img mnt --target backup.img --speed 100M

echo "== fio writes 64 KiB blocks to the live file while the copier runs"
fio --name=guest --filename=mnt/disk.img --rw=randwrite --bs=64k --direct=1 --size=512M \
    --runtime=3 --time_based --ioengine=psync --output-format=terse >/dev/null
"$cowfs" status mnt

echo "== cowfs finish (unmounts, copies what is left, writes the record)"
"$cowfs" finish mnt

echo "== check: the backup is the image as it was at the point in time"
cmp backup.img pristine.img
qemu-img compare -f raw -F raw backup.img pristine.img
cmp -s disk.img pristine.img && { echo "the writer changed nothing?"; exit 1; }
echo "backup.img equals the image at the point in time; disk.img kept the writes."
echo "backup size on disk: $(du -h backup.img | cut -f1) of $(du -h --apparent-size backup.img | cut -f1)"

echo
echo "== a mount that lives as long as the VM: cowfs mount without --target"
"$cowfs" mount disk.img mnt
fio --name=guest --filename=mnt/disk.img --rw=randwrite --bs=64k --direct=1 --size=512M \
    --runtime=3 --time_based --ioengine=psync --output-format=terse >/dev/null &
writer=$!
echo "== cowfs backup while fio writes: a full backup that anchors the bitmap 'nightly'"
"$cowfs" backup mnt --target full.qcow2 --bitmap nightly --wait
wait "$writer"
echo "== the writer is done; an incremental holds only what it wrote since the full"
"$cowfs" backup mnt --sync incremental --bitmap nightly --backing full.qcow2 \
    --target inc1.qcow2 --wait
"$cowfs" status mnt
echo "== check: the chain restores the live image as it is now (nobody writes)"
qemu-img check -q inc1.qcow2
qemu-img compare -f qcow2 -F raw inc1.qcow2 mnt/disk.img
echo "inc1.qcow2 ($(du -h inc1.qcow2 | cut -f1)) over full.qcow2 equals the live image."
cp --sparse=always mnt/disk.img now.img   # what the chain must restore (nobody writes)
"$cowfs" unmount mnt

echo
echo "== verify and restore: every cluster of the chain against its checksum"
"$cowfs" verify inc1.qcow2
"$cowfs" restore inc1.qcow2 restored.img
cmp restored.img now.img
echo "restored.img equals the image at inc1's point in time."
echo "== instant restore: the image is usable at once while a copier fills it"
"$cowfs" restore inc1.qcow2 live.img --live mnt --speed 100M
cmp mnt/live.img now.img   # reads restore what they touch first
dd if=/dev/urandom of=mnt/live.img bs=64k count=16 seek=100 conv=notrunc,fsync status=none
"$cowfs" status mnt
"$cowfs" unmount mnt
"$cowfs" info live.img | head -1
echo "live.img is whole: the backup plus the 1 MiB written through the live restore."

echo
echo "== a deduplicating repository on S3: a throwaway one-node Ceph (radosgw) on 127.0.0.1"
eval "$("$root/scripts/radosgw.sh" start "$work/rgw")"
export XDG_CONFIG_HOME=$work/config XDG_CACHE_HOME=$work/cache   # keep the demo out of ~
"$root/.venv/bin/python" -c "import boto3, os; boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL']).create_bucket(Bucket='backups')"
"$cowfs" repo init s3://backups/cowfs --endpoint "$AWS_ENDPOINT_URL"
cp --sparse=always now.img disk2.img   # a second disk: the same data, so it dedups
"$cowfs" mount now.img disk2.img mnt
fio --name=guest --filename=mnt/now.img --rw=randwrite --bs=64k --direct=1 --size=512M \
    --runtime=3 --time_based --ioengine=psync --output-format=terse >/dev/null &
writer=$!
"$cowfs" backup mnt --repo s3://backups/cowfs --bitmap nightly --wait
wait "$writer"
dd if=/dev/urandom of=mnt/disk2.img bs=64k count=16 seek=300 conv=notrunc,fsync status=none
"$cowfs" backup mnt --repo s3://backups/cowfs --sync incremental --bitmap nightly --wait
cp --sparse=always mnt/disk2.img disk2-now.img
"$cowfs" unmount mnt
"$cowfs" repo list s3://backups/cowfs
"$cowfs" repo verify s3://backups/cowfs
newest=$("$cowfs" repo list s3://backups/cowfs --json | "$root/.venv/bin/python" -c \
    "import json, sys; print([r['snapshot'] for r in json.load(sys.stdin) if r['snapshot'].startswith('disk2')][-1])")
"$cowfs" restore "s3://backups/cowfs/$newest" from-repo.img
cmp from-repo.img disk2-now.img
echo "from-repo.img equals disk2.img at the incremental's point in time."
"$root/scripts/radosgw.sh" stop "$work/rgw"
