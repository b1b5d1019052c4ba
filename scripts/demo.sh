#!/usr/bin/env bash
# Start the main job on a fresh machine: a local mars node on loopback with a
# file-backed disk, serving the replicated device r0 over NBD. Ctrl-C stops it
# (marsd writes everything back first). State lives in $DEMO_DIR (default ./demo);
# running the script again reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-$PWD/demo}
SIZE=${DEMO_SIZE:-1G}
NBD=${DEMO_NBD:-127.0.0.1:10809}
LISTEN=${DEMO_LISTEN:-127.0.0.1:7701}

cargo build --release -p mars
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
export MARS_DIR=$DEMO_DIR/node
mkdir -p "$DEMO_DIR"
if [ ! -f "$MARS_DIR/node.json" ]; then
  "$BIN/marsadm" create-cluster --node alpha --listen "$LISTEN" --nbd "$NBD"
fi
[ -f "$DEMO_DIR/disk-r0.img" ] || truncate -s "$SIZE" "$DEMO_DIR/disk-r0.img"

"$BIN/marsd" --dir "$MARS_DIR" 2>>"$DEMO_DIR/marsd.log" &
MARSD=$!
trap 'kill -TERM $MARSD 2>/dev/null; wait $MARSD' INT TERM EXIT
for _ in $(seq 100); do
  "$BIN/marsadm" view >/dev/null 2>&1 && break
  kill -0 $MARSD 2>/dev/null || { cat "$DEMO_DIR/marsd.log"; exit 1; }
  sleep 0.1
done
if ! "$BIN/marsadm" view r0 >/dev/null 2>&1; then
  "$BIN/marsadm" create-resource r0 "$DEMO_DIR/disk-r0.img"
fi
"$BIN/marsadm" wait-resource r0 primary --timeout 30
"$BIN/marsadm" view
cat <<MSG

The replicated device r0 is served at nbd://$NBD/r0 (log: $DEMO_DIR/marsd.log).
Try, in another shell:
  qemu-io -f raw nbd://$NBD/r0 -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
  nbdinfo nbd://$NBD/r0
  MARS_DIR=$MARS_DIR $BIN/marsadm view --json
A kernel block device: nbdfuse DIR nbd://$NBD/r0 & losetup -f --show DIR/nbd
Ctrl-C stops marsd.
MSG
wait $MARSD
