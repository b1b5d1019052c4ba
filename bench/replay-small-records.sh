#!/usr/bin/env bash
# bench/replay-small-records.sh BINDIR: time the replay of 256 MiB of 4 KiB random writes on a
# secondary (two marsd on loopback, node dirs and disks on tmpfs /dev/shm): replay paused while
# fio writes through the primary, then resumed and timed until the secondary is up to date.
# Compare two builds by running it with each one's target/release.
set -euo pipefail
BIN=$1
W=$(mktemp -d /dev/shm/r4k.XXXX)
fp() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
A=$(fp); AN=$(fp); B=$(fp); BN=$(fp)
$BIN/marsadm --dir $W/a create-cluster --node alpha --listen 127.0.0.1:$A --nbd 127.0.0.1:$AN >/dev/null
$BIN/marsd --dir $W/a 2>$W/a.log & PA=$!
for _ in $(seq 100); do $BIN/marsadm --dir $W/a view >/dev/null 2>&1 && break; sleep 0.1; done
$BIN/marsadm --dir $W/b join-cluster --node beta --listen 127.0.0.1:$B --nbd 127.0.0.1:$BN 127.0.0.1:$A >/dev/null
$BIN/marsd --dir $W/b 2>$W/b.log & PB=$!
trap 'kill $PA $PB 2>/dev/null; wait 2>/dev/null; rm -rf $W' EXIT
$BIN/marsadm --dir $W/a wait-cluster --timeout 30 >/dev/null
truncate -s 256M $W/a.img $W/b.img
$BIN/marsadm --dir $W/a create-resource r0 $W/a.img >/dev/null
for _ in $(seq 100); do $BIN/marsadm --dir $W/b view r0 >/dev/null 2>&1 && break; sleep 0.1; done
$BIN/marsadm --dir $W/b join-resource r0 $W/b.img >/dev/null
$BIN/marsadm --dir $W/a wait-resource r0 uptodate --timeout 60
$BIN/marsadm --dir $W/b pause-replay r0 >/dev/null
fio --name=w --ioengine=nbd --uri=nbd://127.0.0.1:$AN/r0 --rw=randwrite --bs=4k --iodepth=32 --size=256M --io_size=256M --randrepeat=0 --output-format=terse >/dev/null
$BIN/marsadm --dir $W/b wait-resource r0 uptodate --timeout 1 >/dev/null 2>&1 || true
# wait until fetched everything
for _ in $(seq 300); do
  v=$($BIN/marsadm --dir $W/b view r0 --json)
  if python3 -c 'import json,sys; v=json.loads(sys.argv[1]); m={x["node"]:x for x in v["resources"][0]["members"]}; sys.exit(0 if m["beta"]["log"]["fetched"]>=m["alpha"]["log"]["written"] else 1)' "$v"; then break; fi
  sleep 0.1
done
t0=$(date +%s.%N)
$BIN/marsadm --dir $W/b resume-replay r0 >/dev/null
$BIN/marsadm --dir $W/b wait-resource r0 uptodate --timeout 120 >/dev/null
t1=$(date +%s.%N)
python3 -c "print('replay of 256 MiB in 4 KiB records: %.2f s' % ($t1-$t0))"
