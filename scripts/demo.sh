#!/usr/bin/env bash
# Start the main job on a fresh machine: a local mars cluster of three nodes
# (alpha, beta, gamma) on loopback, each with its own directory and file-backed
# disk, replicating the resource r0; alpha is its primary and serves it over
# NBD, beta and gamma are secondaries (full sync, then fetch and replay).
# Ctrl-C stops all three (each marsd writes everything back first). State lives
# in $DEMO_DIR (default ./demo); running the script again reuses it.
#
# Environment: DEMO_DIR, DEMO_SIZE (default 1G), DEMO_NODES (default 3),
# DEMO_PORT (first port, default 7701: node i listens on DEMO_PORT+i for peers
# and serves NBD on 10809+i).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-$PWD/demo}
SIZE=${DEMO_SIZE:-1G}
COUNT=${DEMO_NODES:-3}
PORT=${DEMO_PORT:-7701}
NAMES=(alpha beta gamma delta epsilon zeta eta theta)
[[ "$COUNT" =~ ^[1-8]$ ]] || { echo "demo: DEMO_NODES must be 1..8" >&2; exit 2; }

cargo build --release -p mars
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
mkdir -p "$DEMO_DIR"

adm() { local i=$1; shift; "$BIN/marsadm" --dir "$DEMO_DIR/${NAMES[$i]}" "$@"; }
listen() { echo "127.0.0.1:$((PORT + $1))"; }
nbd() { echo "127.0.0.1:$((10809 + $1))"; }

PIDS=()
stop_all() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap stop_all INT TERM EXIT

start() {
  local i=$1 name=${NAMES[$1]}
  "$BIN/marsd" --dir "$DEMO_DIR/$name" 2>>"$DEMO_DIR/$name.log" &
  PIDS+=($!)
  for _ in $(seq 100); do
    adm "$i" view >/dev/null 2>&1 && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$DEMO_DIR/$name.log"; exit 1; }
    sleep 0.1
  done
  echo "demo: $name did not start (see $DEMO_DIR/$name.log)" >&2
  exit 1
}

for ((i = 0; i < COUNT; i++)); do
  name=${NAMES[$i]}
  if [ ! -f "$DEMO_DIR/$name/node.json" ]; then
    if [ "$i" -eq 0 ]; then
      adm 0 create-cluster --node "$name" --listen "$(listen 0)" --nbd "$(nbd 0)"
    else
      token=$(adm 0 invite)
      adm "$i" join-cluster --node "$name" --listen "$(listen "$i")" --nbd "$(nbd "$i")" --token "$token" "$(listen 0)"
    fi
  fi
  [ -f "$DEMO_DIR/disk-$name.img" ] || truncate -s "$SIZE" "$DEMO_DIR/disk-$name.img"
  start "$i"
done
adm 0 wait-cluster --timeout 60

if ! adm 0 view r0 >/dev/null 2>&1; then
  adm 0 create-resource r0 "$DEMO_DIR/disk-alpha.img"
fi
for ((i = 1; i < COUNT; i++)); do
  # The new resource reaches the other nodes by gossip within a moment.
  for _ in $(seq 300); do adm "$i" view r0 >/dev/null 2>&1 && break; sleep 0.1; done
  member=$(adm "$i" view r0 --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(any(m["node"]==v["node"] for m in v["resources"][0]["members"]))')
  if [ "$member" != True ]; then
    adm "$i" join-resource r0 "$DEMO_DIR/disk-${NAMES[$i]}.img"
  fi
done
adm 0 wait-resource r0 primary --timeout 60
echo "demo: waiting for the secondaries' full sync (a progress bar shows on a terminal)"
adm 0 wait-resource r0 uptodate --timeout 600
adm 0 view
PRIMARY=$(adm 0 view r0 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["resources"][0]["device"] or "")')
cat <<MSG

The replicated device r0 is served at $PRIMARY; ${COUNT} nodes replicate it.
Node directories and logs: $DEMO_DIR/<node>/, $DEMO_DIR/<node>.log.
Try, in another shell:
  qemu-io -f raw $PRIMARY -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
  $BIN/marsadm --dir $DEMO_DIR/alpha view            # or view --json
  $BIN/marsadm --dir $DEMO_DIR/beta wait-resource r0 uptodate
  cmp $DEMO_DIR/disk-alpha.img $DEMO_DIR/disk-beta.img   # once uptodate
  $BIN/marsadm --dir $DEMO_DIR/beta primary r0        # planned handover to beta
A kernel block device: nbdfuse DIR $PRIMARY & losetup -f --show DIR/nbd
Ctrl-C stops all nodes.
MSG
wait
