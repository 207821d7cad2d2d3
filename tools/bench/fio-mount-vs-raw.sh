#!/usr/bin/env bash
# fio through one csvfs mount against fio's nbd engine on a raw LUN, interleaved per
# workload (raw, then mount) so that both halves of a ratio see the same machine load.
# The raw LUN is its own served file, so the volume is never overwritten by the raw runs.
# Usage: tools/bench/fio-mount-vs-raw.sh [BIN_DIR] [SECONDS] [WORK_DIR]
#   BIN_DIR holds csvfs and mkfs-csvfs (default target/release), SECONDS per fio run
#   (default 3), WORK_DIR for the LUN files, sockets and the mountpoint (default a new
#   directory under /tmp, removed afterwards). Needs fio with the nbd engine.
set -euo pipefail
B=$(realpath "${1:-target/release}")
S=${2:-3}
R=${3:-$(mktemp -d /tmp/fio-mount-vs-raw.XXXXXX)}
mkdir -p "$R/mnt"
truncate -s 8G "$R/lun.img" "$R/raw.img"
echo fio-mount-vs-raw-secret > "$R/secret"
pids=()
cleanup() {
    umount -l "$R/mnt" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 1
    rm -rf "$R"
}
trap cleanup EXIT
for f in lun raw; do
    "$B/csvfs" serve-lun "$R/$f.img" --listen "unix:$R/$f.sock" --export lun >"$R/$f.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$R/$f.sock" ] && break; sleep 0.1; done
done
"$B/mkfs-csvfs" -q -f "nbd+unix:///lun?socket=$R/lun.sock"
"$B/csvfs" mount --lun "nbd+unix:///lun?socket=$R/lun.sock" --node-id 1 --secret "$R/secret" \
    "$R/mnt" >"$R/mount.log" 2>&1 &
pids=($! "${pids[@]}")
for _ in $(seq 200); do mountpoint -q "$R/mnt" && break; sleep 0.1; done
run() {
    sync
    sleep 1
    fio --name=bench --rw="$1" --bs="$2" --iodepth=32 --size=536870912 --time_based \
        --runtime="$S" --output-format=terse --terse-version=3 "${@:3}" 2>/dev/null | grep '^3;'
}
printf '%-10s %8s %14s %14s %6s\n' workload bs raw mount ratio
for w in "write 1048576 48" "read 1048576 7" "randwrite 4096 49" "randread 4096 8"; do
    set -- $w
    raw=$(run "$1" "$2" --ioengine=nbd "--uri=nbd+unix:///lun?socket=$R/raw.sock" | cut -d';' -f"$3")
    fs=$(run "$1" "$2" --ioengine=libaio --direct=1 "--filename=$R/mnt/bench.img" | cut -d';' -f"$3")
    unit=$([ "$2" = 4096 ] && echo IOPS || echo KiB/s)
    printf '%-10s %8s %14s %14s %6s\n' "$1" "$2" "$raw $unit" "$fs $unit" "$(echo "scale=2; $fs / $raw" | bc)"
done
