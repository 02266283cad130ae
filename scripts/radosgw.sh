#!/usr/bin/env bash
# A throwaway one-node Ceph cluster with radosgw on 127.0.0.1: a real S3 engine for tests.
#
#   scripts/radosgw.sh start DIR   # prints `export ...` lines (also written to DIR/env)
#   scripts/radosgw.sh stop DIR    # SIGKILLs DIR's daemons, removes its data, keeps DIR/*.log
#
# One mon, one OSD on memstore (the data lives in the OSD's memory and dies with it), radosgw
# with beast, no mgr, no auth between daemons. Everything (config, run dir, admin sockets,
# logs, pids) stays in DIR, so clusters in different DIRs run side by side.
# Environment: COWFS_RGW_PORT, COWFS_MON_PORT (default: free ports the kernel picks),
# COWFS_RGW_MEMSTORE (what the OSD may hold, in bytes or with K/M/G/T, default 4G; the OSD's
# memory grows by about twice what it holds), COWFS_RGW_ACCESS_KEY,
# COWFS_RGW_SECRET_KEY (default cowfs / cowfs-secret), COWFS_RGW_TIMEOUT (seconds, default 60).
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}
(($# == 2)) || usage
action=$1
if [[ $action == stop && ! -d $2 ]]; then exit 0; fi  # nothing to stop
mkdir -p "$2"
dir=$(cd "$2" && pwd -P)  # absolute: it is how stop recognises this cluster's processes
conf=$dir/ceph.conf
timeout_s=${COWFS_RGW_TIMEOUT:-60}

log() { echo "radosgw.sh: $*" >&2; }
# Timestamps in DIR/setup.log, to see which step a slow start spent its time in.
mark() { echo "== $EPOCHREALTIME $*" >>"$dir/setup.log"; }
quietly() { "$@" >>"$dir/setup.log" 2>&1; }  # a set-up step, its output kept for a post-mortem

# The pids of every process that runs with `-c $conf`: the daemons, and any tool of this
# cluster that an interrupted start left behind. Stop goes by this rather than by the pid
# files: the exact argument never matches another DIR's cluster, nor a recycled pid.
cluster_pids() {
    local p args a
    for p in /proc/[0-9]*; do
        mapfile -d '' args 2>/dev/null <"$p/cmdline" || continue  # gone meanwhile
        for a in "${args[@]}"; do
            if [[ $a == "$conf" ]]; then
                echo "${p#/proc/}"
                break
            fi
        done
    done
}

# Gone or a zombie: a zombie holds no port, memory or file, and its parent reaps it.
alive() {
    local stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }  # the state follows the command name, which may hold spaces
    [[ ${stat%% *} != Z ]]
}

stop_cluster() {
    local pids p deadline
    # SIGKILL: the data is throwaway, and SIGTERM makes the OSD and mon take seconds.
    mapfile -t pids < <(cluster_pids)
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    deadline=$((SECONDS + 10))
    for p in "${pids[@]}"; do
        while alive "$p"; do
            if ((SECONDS > deadline)); then
                log "pid $p of $dir survived SIGKILL"
                return 1
            fi
            sleep 0.02
        done
    done
    rm -rf "$dir"/{mon.a,osd.0,rgw,run,crash,pids} "$dir"/{ceph.conf,monmap,env}
}

# A free TCP port on 127.0.0.1 outside the OSD's range 6800-7300: the kernel picks one from
# its ephemeral range (32768+), unless the environment variable named by $1 sets one, which
# is checked. Another start could take it before our daemon binds it: then our start fails
# (the daemon dies, and says so), it never hijacks the other cluster.
pick_port() {
    python3 - "$1" "${!1:-0}" <<'EOF'
import socket, sys
var, want = sys.argv[1], int(sys.argv[2])
if 6800 <= want <= 7300:
    sys.exit(f"radosgw.sh: {var}={want} is in the OSD's port range 6800-7300")
with socket.socket() as s:
    try:
        s.bind(("127.0.0.1", want))
    except OSError as e:
        sys.exit(f"radosgw.sh: {var}={want}: {e.strerror}")
    print(s.getsockname()[1])
EOF
}

# Starts a daemon in its own session (so the caller's Ctrl-C or process group kill leaves it
# to `stop`), stdio to its log, and records its pid. A non-interactive shell does not make
# a background job a group leader, so setsid execs in place and $! is the daemon's pid.
spawn() {
    local name=$1
    shift
    setsid "$@" -c "$conf" -f </dev/null >>"$dir/$name.log" 2>&1 &
    echo $! >"$dir/pids/$name.pid"
    disown $!  # outlives this script; no "Killed" job notices when a failed start kills it
}

# Fails the start at once, with the log's tail, when a daemon has died.
check_daemons() {
    local f name pid
    for f in "$dir"/pids/*.pid; do
        name=$(basename "$f" .pid)
        read -r pid <"$f"
        if ! alive "$pid"; then
            log "$name died; the end of $dir/$name.log:"
            tail -n 20 "$dir/$name.log" >&2
            return 1
        fi
    done
}

# Polls a condition (a command) until it holds, a daemon dies or the time runs out.
wait_for() {
    local what=$1 deadline=$((SECONDS + timeout_s))
    shift
    until "$@" 2>/dev/null; do
        check_daemons
        if ((SECONDS > deadline)); then
            log "timed out after ${timeout_s}s waiting for $what"
            return 1
        fi
        sleep 0.02
    done
}

# A set-up step that needs the daemons (a mon command, the user's creation): it would hang
# on a dead one, so it runs in the background while wait_for watches them.
watched() {
    local what=$1 pid
    shift
    "$@" >>"$dir/setup.log" 2>&1 &
    pid=$!
    wait_for "$what" eval '! alive '"$pid"
    wait "$pid"  # its exit status
}

# A signed ListBuckets: the user exists and radosgw serves S3. radosgw refuses SigV4 without
# x-amz-content-sha256, which curl 7.88 leaves out.
s3_answers() {
    curl -fsS -o /dev/null --max-time 5 -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
        --aws-sigv4 "aws:amz:$region:s3" --user "$access_key:$secret_key" "$endpoint/"
}

start_cluster() {
    local mon_port rgw_port memstore fsid osd_uuid t0=$EPOCHREALTIME
    for tool in ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool curl python3; do
        command -v "$tool" >/dev/null || {
            log "$tool is missing: install ceph-mon ceph-osd radosgw ceph-common (scripts/setup.sh)"
            exit 1
        }
    done
    if [[ -n $(cluster_pids) ]]; then
        log "a cluster is already running in $dir; stop it first"
        exit 1
    fi
    stop_cluster  # leftovers of an earlier run
    rm -f "$dir"/*.log
    mon_port=$(pick_port COWFS_MON_PORT)
    rgw_port=$(pick_port COWFS_RGW_PORT)
    if [[ $mon_port == "$rgw_port" ]]; then
        log "the mon and radosgw ports are the same: $mon_port"
        exit 1
    fi
    memstore=${COWFS_RGW_MEMSTORE:-4294967296}
    if ! [[ $memstore =~ ^[0-9]+[KMGT]?$ ]]; then  # Ceph would silently take 1 GiB instead
        log "COWFS_RGW_MEMSTORE=$memstore: want bytes, or a number with K, M, G or T"
        exit 1
    fi
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    access_key=${COWFS_RGW_ACCESS_KEY:-cowfs}
    secret_key=${COWFS_RGW_SECRET_KEY:-cowfs-secret}
    region=us-east-1
    endpoint=http://127.0.0.1:$rgw_port
    mkdir -p "$dir"/{mon.a,osd.0,rgw,run,crash,pids}
    # Whatever ends the start early (a failed step, a time-out, Ctrl-C) takes the daemons too.
    trap 'exit 1' INT TERM
    trap 'log "start failed; logs are in $dir"; stop_cluster || true' EXIT

    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$mon_port
public addr = 127.0.0.1
cluster addr = 127.0.0.1
# msgr2 only: half the OSD's ports, and the mon has a single address
ms bind msgr1 = false
# no cephx: nothing here is secret, and no keyrings to make
auth cluster required = none
auth service required = none
auth client required = none
# without it, clients (radosgw) and the mon never agree on a msgr2 mode under auth none
ms mon client mode = crc
keyring = /dev/null
# nothing outside DIR: run dir, sockets, logs, crash reports, data
run dir = $dir/run
crash dir = $dir/crash
log file = $dir/\$name.log
mon cluster log file = $dir/cluster.log
mon data = $dir/\$name
osd data = $dir/\$name
# a single copy of everything on the single OSD
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
# radosgw makes about 7 pools: few PGs keep it well under the per-OSD limit
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
# pool and user changes commit in ms instead of about a second each (9 s to make a user)
paxos propose interval = 0.01
# the mon's periodic work (such as PGs still to create) every second, not every 5 s
mon tick interval = 1
# a nearly full disk would otherwise stop the mon; the data is in memory anyway
mon data avail crit = 0
mon data avail warn = 0

[mon]
admin socket = $dir/run/\$name.asok

[osd]
admin socket = $dir/run/\$name.asok
osd objectstore = memstore
memstore device bytes = $memstore

[client]
# the CLI tools make no admin sockets (they would clash between two concurrent calls)
admin socket =

[client.rgw]
admin socket = $dir/run/\$name.asok
rgw data = $dir/rgw
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
# the parts of deleted objects past their first 4 MiB go to the garbage collector, which
# by default frees them (here: the OSD's memory) 2 hours later
rgw gc obj min wait = 5
rgw gc processor period = 5
EOF

    mark "mkfs"
    quietly monmaptool --create --addv a "[v2:127.0.0.1:$mon_port]" --fsid "$fsid" "$dir/monmap"
    quietly ceph-mon -c "$conf" -i a --mkfs --monmap "$dir/monmap"
    # --no-mon-config: the OSD's mkfs needs nothing from the mon, so it goes before it.
    quietly ceph-osd -c "$conf" -i 0 --mkfs --no-mon-config --osd-uuid "$osd_uuid"
    spawn mon.a ceph-mon -i a
    # The OSD must exist in the osdmap before it boots; the CLI waits for the mon to answer.
    mark "osd new"
    watched "the mon to add osd.0" ceph -c "$conf" osd new "$osd_uuid" 0
    spawn osd.0 ceph-osd -i 0
    # Only then radosgw: a pool made while no OSD is up gets its PGs at the mon's next tick,
    # not at once, and every S3 request waits for that.
    mark "osd boot"
    wait_for "osd.0 to boot" grep -q 'state: booting -> active' "$dir/osd.0.log"
    spawn client.rgw radosgw -n client.rgw
    mark "user create"
    watched "the S3 user's creation" radosgw-admin -c "$conf" user create --uid cowfs \
        --display-name cowfs --access-key "$access_key" --secret-key "$secret_key"
    mark "wait for S3"
    wait_for "radosgw at $endpoint" s3_answers
    mark "up"
    trap - EXIT INT TERM

    cat >"$dir/env" <<EOF
export AWS_ACCESS_KEY_ID=$access_key
export AWS_SECRET_ACCESS_KEY=$secret_key
export AWS_DEFAULT_REGION=$region
export AWS_ENDPOINT_URL=$endpoint
EOF
    cat "$dir/env"
    log "up in $(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}")s: $endpoint" \
        "(mon 127.0.0.1:$mon_port, pids and logs in $dir)"
}

case $action in
start) start_cluster ;;
stop) stop_cluster ;;
*) usage ;;
esac
