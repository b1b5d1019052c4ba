#!/usr/bin/env bash
# bench/replication.sh: replication benchmarks of mars on 127.0.0.1, one run, three marsd.
#
# Three nodes (alpha = primary, beta, gamma) run side by side on 127.0.0.1, each with its own
# node directory and file-backed disks in one work directory (same filesystem), with default
# node settings. Measured, in this order:
#   1. primary write throughput (fio ioengine=nbd against alpha's export) with resource r0 on
#      alpha alone, then after beta joined, then after gamma joined (each join waited for with
#      `wait-resource r0 uptodate`); same disk size and settings in every configuration;
#   2. lag at 80 % of the 0-secondary peak (fio --rate) with 2 secondaries, sampling the
#      secondaries' `lag_seconds`/`lag_bytes` every 100 ms;
#   3. catch-up: pause-fetch (and separately pause-replay) on beta, write BENCH_CATCHUP bytes,
#      resume, time until beta's `log.replayed` reaches alpha's `log.written`;
#   4. full sync of a second resource r1 (BENCH_SIZE, random data on alpha) to beta with an
#      equal copy of the disk and to gamma with a completely different (random) disk.
# Results go to stdout and to $BENCH_OUT as a markdown table.
#
# Environment:
#   BENCH_DIR      work directory (default: a new mktemp -d, removed at exit)
#   BENCH_SIZE     device size of r0 and r1, anything fallocate -l takes (default 1G)
#   BENCH_RUNTIME  seconds per fio throughput row and for the lag row (default 15)
#   BENCH_REPEAT   run every throughput row this many times per configuration; the table
#                  shows the median (default 1)
#   BENCH_CATCHUP  bytes written while beta is paused, for the catch-up rows (default 1G)
#   BENCH_RAND=0   skip the 4 KiB random-write rows
#   BENCH_CATCHUP_SETTLE=0  resume the paused secondary right after the write, while gamma
#                  still replays and alpha's and gamma's disks are written back (default 1:
#                  wait for gamma and `sync` first, so the timed window is beta's work alone)
#   BENCH_OUT      markdown output (default bench/replication-results.md)
#   BENCH_KEEP=1   keep the work directory (logs, fio JSON, samples) at exit
#   BENCH_NO_BUILD=1  skip cargo build (use the binaries already in $CARGO_TARGET_DIR/release)
#   BENCH_MIN_FREE_GIB  stop when the work filesystem has less free space (default 8)
#   BENCH_ONLY=sync  run only the full-sync rows (4.): no prefill, throughput, lag or catch-up
#   BENCH_ONLY=catchup  run only the catch-up rows (3.), after the prefill and both joins
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_SIZE="${BENCH_SIZE:-1G}"
BENCH_RUNTIME="${BENCH_RUNTIME:-15}"
BENCH_REPEAT="${BENCH_REPEAT:-1}"
BENCH_CATCHUP="${BENCH_CATCHUP:-1G}"
BENCH_RAND="${BENCH_RAND:-1}"
BENCH_CATCHUP_SETTLE="${BENCH_CATCHUP_SETTLE:-1}"
BENCH_MIN_FREE_GIB="${BENCH_MIN_FREE_GIB:-8}"
BENCH_ONLY="${BENCH_ONLY:-}"
RATE80=0 # set by the lag row
BENCH_OUT="${BENCH_OUT:-$ROOT/bench/replication-results.md}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
CMDLINE="${BENCH_ONLY:+BENCH_ONLY=$BENCH_ONLY }BENCH_SIZE=$BENCH_SIZE BENCH_RUNTIME=$BENCH_RUNTIME BENCH_REPEAT=$BENCH_REPEAT BENCH_CATCHUP=$BENCH_CATCHUP BENCH_CATCHUP_SETTLE=$BENCH_CATCHUP_SETTLE BENCH_RAND=$BENCH_RAND $(printf '%q ' "$0" "$@")"

die() { echo "bench: $*" >&2; exit 1; }
say() { echo "bench: $(date +%T) $*" >&2; }
[[ "$BENCH_REPEAT" =~ ^[1-9][0-9]*$ ]] || die "BENCH_REPEAT must be a positive integer"
[[ "$BENCH_RUNTIME" =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNTIME must be a positive integer (seconds)"
[[ -z "$BENCH_ONLY" || "$BENCH_ONLY" == sync || "$BENCH_ONLY" == catchup ]] \
    || die "BENCH_ONLY must be empty, 'sync' or 'catchup'"

# ------------------------------------------------------------------ prerequisites
for t in fio python3 fallocate cargo; do
    command -v "$t" >/dev/null || die "$t not found (apt-get install fio python3 util-linux; cargo from rustup)"
done
if ! fio --enghelp=nbd >/dev/null 2>&1; then
    die "this fio has no 'nbd' ioengine: install the Debian package 'fio' built with libnbd (apt-get install fio libnbd0)"
fi
to_bytes() { numfmt --from=iec "${1%B}" 2>/dev/null || die "cannot parse size $1"; }
CATCHUP_BYTES="$(to_bytes "$BENCH_CATCHUP")"

# ------------------------------------------------------------------ build
if [[ "${BENCH_NO_BUILD:-0}" != 1 ]]; then
    say "building (cargo build --release -p mars, target dir $CARGO_TARGET_DIR)"
    (cd "$ROOT" && cargo build --release -p mars) >&2
fi
MARSD="$CARGO_TARGET_DIR/release/marsd"
MARSADM="$CARGO_TARGET_DIR/release/marsadm"
[[ -x "$MARSD" && -x "$MARSADM" ]] || die "no marsd/marsadm in $CARGO_TARGET_DIR/release"

# ------------------------------------------------------------------ work dir, cleanup
CREATED_DIR=0
if [[ -z "${BENCH_DIR:-}" ]]; then
    BENCH_DIR="$(mktemp -d /tmp/mars-repl-bench.XXXXXX)"
    CREATED_DIR=1
fi
mkdir -p "$BENCH_DIR"
W="$(cd "$BENCH_DIR" && pwd)"
[[ -e "$W/alpha" || -e "$W/res" ]] && die "$W already holds a previous run; use an empty BENCH_DIR"
mkdir -p "$W/res" "$W/disks"

NODES=(alpha beta gamma)
declare -A PID=() PEER=() NBD=()
LAG_PID=""
stop_pid() { # pid, name, seconds to wait after SIGTERM
    local pid="$1" name="$2" secs="$3" i
    [[ -n "$pid" ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    say "$name ($pid) did not stop after ${secs}s, killing it"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$LAG_PID" lag-sampler 5
    for n in gamma beta alpha; do stop_pid "${PID[$n]:-}" "marsd $n" 120; done
    if [[ $CREATED_DIR == 1 && "${BENCH_KEEP:-0}" != 1 ]]; then
        rm -rf "$W"
    else
        say "work directory kept: $W"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ helper (python): CPU accounting, polling view --json, report
cat >"$W/helper.py" <<'PYEOF'
import json, os, resource, statistics, subprocess, sys, time
MARSADM = os.environ["MARSADM"]
TCK = os.sysconf("SC_CLK_TCK")

def busy():
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / TCK  # all but idle and iowait

def proc_cpu(pid):
    try:
        s = open(f"/proc/{pid}/stat").read()
    except OSError:
        return 0.0
    f = s[s.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / TCK

def disk_io():
    """(sectors read, sectors written, ms busy) of the work directory's block device, or None."""
    dev = os.environ.get("BENCH_BLOCKDEV", "")
    try:
        for line in open("/proc/diskstats"):
            f = line.split()
            if f[2] == dev:
                return int(f[5]), int(f[9]), int(f[12])
    except OSError:
        pass
    return None

class Cpu:
    """CPU seconds of the given marsd processes and of the whole machine between start and stop,
    and the traffic of the work directory's block device."""
    def __init__(self, pids):
        self.pids = pids  # name -> pid
        self.d0 = disk_io()
        self.t0, self.b0 = time.time(), busy()
        self.c0 = {n: proc_cpu(p) for n, p in pids.items()}
        self.r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    def stop(self, child_cpu=None):
        wall = time.time() - self.t0
        b = busy() - self.b0
        c = {n: proc_cpu(p) - self.c0[n] for n, p in self.pids.items()}
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        if child_cpu is None:
            child_cpu = (r.ru_utime - self.r0.ru_utime) + (r.ru_stime - self.r0.ru_stime)
        other = max(0.0, b - sum(c.values()) - child_cpu)
        d1 = disk_io()
        dev = None
        if self.d0 is not None and d1 is not None:
            dev = {"read_bytes": (d1[0] - self.d0[0]) * 512, "written_bytes": (d1[1] - self.d0[1]) * 512,
                   "busy_s": (d1[2] - self.d0[2]) / 1000}
        return {"wall": wall, "marsd_cpu": c, "client_cpu": child_cpu, "other_cpu": other, "device": dev}

def pids_arg(s):  # "alpha=123,beta=456"
    return {k: int(v) for k, v in (x.split("=") for x in s.split(",") if x)}

def view(d, res):
    out = subprocess.run([MARSADM, "--dir", d, "view", res, "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"view on {d}: {out.stderr.strip()}")
    return json.loads(out.stdout)

def member(v, res, node):
    for r in v["resources"]:
        if r["name"] == res:
            for m in r["members"]:
                if m["node"] == node:
                    return m
    return None

def own(d, res, node):
    return member(view(d, res), res, node)

def cmd_runfio(out, pids, *cmd):
    c = Cpu(pids_arg(pids))
    rc = subprocess.call(list(cmd))
    json.dump(c.stop(), open(out, "w"))
    sys.exit(rc)

def cmd_written(d, res, node):
    """The primary's log.written once it holds still for 1 s (the writes before were flushed)."""
    last, since = None, time.time()
    while True:
        w = own(d, res, node)["log"]["written"]
        if w != last:
            last, since = w, time.time()
        elif time.time() - since >= 1.0:
            print(w)
            return
        time.sleep(0.1)

def cmd_wait_field(d, res, node, field, target, timeout):
    """Untimed: wait until the member's own log.FIELD reaches target."""
    target, deadline = int(target), time.time() + float(timeout)
    while own(d, res, node)["log"][field] < target:
        if time.time() > deadline:
            raise SystemExit(f"{node}: log.{field} did not reach {target} within {timeout} s")
        time.sleep(0.1)

def cmd_catchup(out, pids, d, res, node, kind, target, timeout):
    """Resume fetch or replay on a paused secondary, time until its log.replayed reaches target."""
    target, deadline = int(target), time.time() + float(timeout)
    m = own(d, res, node)
    start_replayed, start_fetched = m["log"]["replayed"], m["log"]["fetched"]
    c = Cpu(pids_arg(pids))
    t0 = time.time()
    subprocess.run([MARSADM, "--dir", d, f"resume-{kind}", res], check=True, capture_output=True)
    samples, polls = [], 0
    while True:
        m = own(d, res, node)
        polls += 1
        now = time.time() - t0
        samples.append((round(now, 3), m["log"]["fetched"], m["log"]["replayed"]))
        if m["log"]["replayed"] >= target:
            break
        if time.time() > deadline:
            raise SystemExit(f"{node}: catch-up after resume-{kind} not done within {timeout} s: {m}")
        time.sleep(0.05)
    r = c.stop()
    r.update(kind=kind, elapsed=samples[-1][0], bytes=target - start_replayed,
             start_replayed=start_replayed, start_fetched=start_fetched, target=target,
             samples=samples, polls=polls)
    json.dump(r, open(out, "w"))
    print(f"{kind}: {r['bytes']} bytes in {r['elapsed']:.2f} s", file=sys.stderr)

def sync_done(d, res):
    try:
        return json.load(open(f"{d}/resources/{res}/sync")).get("done") is True
    except (OSError, ValueError):
        return False

def cmd_sync(out, pids, d, res, node, disk, pdir, timeout):
    """join-resource, time until the member's sync is null and its disk uptodate (own view)."""
    deadline = time.time() + float(timeout)
    c = Cpu(pids_arg(pids))
    t0 = time.time()
    subprocess.run([MARSADM, "--dir", d, "join-resource", res, disk], check=True, capture_output=True)
    samples, seen_sync = [], False
    while True:
        m = own(d, res, node)
        now = time.time() - t0
        if m is not None:
            samples.append((round(now, 3), m["disk"], m["sync"]))
            seen_sync |= m["sync"] is not None
            # Right after join-resource the member may show "uptodate" for an instant before its
            # sync task starts: also require the sync state file to say the copy is done.
            if m["sync"] is None and m["disk"] == "uptodate" and sync_done(d, res):
                break
        if time.time() > deadline:
            raise SystemExit(f"{node}: sync of {res} not done within {timeout} s: {m}")
        time.sleep(0.05)
    r = c.stop()
    total = max((s[2]["total"] for s in samples if s[2]), default=0)
    rates = [s[2]["rate"] for s in samples if s[2] and s[2].get("rate")]
    pm = member(view(pdir, res), res, node)  # what the primary reports about the joiner
    r.update(elapsed=samples[-1][0], total=total, blocks_transferred=m["sync_blocks_transferred"],
             view_rate_last=rates[-1] if rates else None, seen_sync=seen_sync,
             primary_sees=pm and {"disk": pm["disk"], "sync": pm["sync"],
                                  "sync_blocks_transferred": pm["sync_blocks_transferred"]},
             samples=samples[:3] + samples[-3:])
    json.dump(r, open(out, "w"))
    print(f"sync {node}: {r['elapsed']:.2f} s, {r['blocks_transferred']} blocks transferred", file=sys.stderr)

def cmd_lag(out, stopfile, interval, res, pdir, pnode, *secs):
    """Sample every secondary's own view and the primary's view until stopfile exists."""
    interval = float(interval)
    secs = [s.split("=") for s in secs]  # node=dir
    f = open(out, "w")
    t0 = time.time()
    nxt = t0
    while not os.path.exists(stopfile):
        rec = {"t": round(time.time() - t0, 3)}
        try:
            pv = view(pdir, res)
            rec["written"] = member(pv, res, pnode)["log"]["written"]
            for n, d in secs:
                m = own(d, res, n)
                pm = member(pv, res, n)
                rec[n] = {"lag_seconds": m["lag_seconds"], "lag_bytes": m["lag_bytes"],
                          "replayed": m["log"]["replayed"], "fetched": m["log"]["fetched"],
                          "p_lag_seconds": pm["lag_seconds"], "p_lag_bytes": pm["lag_bytes"]}
        except Exception as e:  # noqa: BLE001 - keep sampling, record the failure
            rec["error"] = str(e)
        f.write(json.dumps(rec) + "\n")
        f.flush()
        nxt += interval
        time.sleep(max(0.0, nxt - time.time()))

def cmd_hwm(out, pids):
    r = {}
    for n, p in pids_arg(pids).items():
        for line in open(f"/proc/{p}/status"):
            if line.startswith("VmHWM:"):
                r[n] = int(line.split()[1])
    json.dump(r, open(out, "w"))

def cmd_cpusnap(out, pids):
    json.dump({"t": time.time(), "busy": busy(),
               "cpu": {n: proc_cpu(p) for n, p in pids_arg(pids).items()}}, open(out, "w"))

def cmd_cpudelta(a, b, out):
    a, b = json.load(open(a)), json.load(open(b))
    c = {n: b["cpu"][n] - a["cpu"][n] for n in a["cpu"]}
    json.dump({"wall": b["t"] - a["t"], "marsd_cpu": c, "client_cpu": 0.0,
               "other_cpu": max(0.0, b["busy"] - a["busy"] - sum(c.values()))}, open(out, "w"))

if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1].replace("-", "_")](*sys.argv[2:])
PYEOF
export MARSADM
H() { python3 "$W/helper.py" "$@"; }

# ------------------------------------------------------------------ ports (127.0.0.1 only), free space
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
declare -A USED=()
pick_port() {
    local p
    p="$(free_port)"
    while [[ -n "${USED[$p]:-}" ]]; do p="$(free_port)"; done
    USED[$p]=1
    PORT="$p"
}
for n in "${NODES[@]}"; do
    pick_port; PEER[$n]="$PORT"
    pick_port; NBD[$n]="$PORT"
done
free_gib() { df -BG --output=avail "$W" | tail -1 | tr -dc 0-9; }
check_space() {
    local f
    f="$(free_gib)"
    ((f >= BENCH_MIN_FREE_GIB)) || die "only ${f} GiB free on $W (BENCH_MIN_FREE_GIB=$BENCH_MIN_FREE_GIB); stopping"
}
check_space

# ------------------------------------------------------------------ three marsd, default settings
adm() { local n="$1"; shift; "$MARSADM" --dir "$W/$n" "$@"; }
start_marsd() {
    local n="$1" i
    MARS_LOG=warn "$MARSD" --dir "$W/$n" 2>"$W/marsd-$n.log" &
    PID[$n]=$!
    for ((i = 0; i < 300; i++)); do
        adm "$n" view >/dev/null 2>&1 && return 0
        kill -0 "${PID[$n]}" 2>/dev/null || die "marsd $n exited at start: $(cat "$W/marsd-$n.log")"
        sleep 0.1
    done
    die "marsd $n did not answer within 30 s"
}
adm alpha create-cluster --node alpha --listen "127.0.0.1:${PEER[alpha]}" --nbd "127.0.0.1:${NBD[alpha]}" >&2
start_marsd alpha
for n in beta gamma; do
    adm "$n" join-cluster --node "$n" --listen "127.0.0.1:${PEER[$n]}" --nbd "127.0.0.1:${NBD[$n]}" \
        "127.0.0.1:${PEER[alpha]}" >&2
    start_marsd "$n"
done
adm alpha wait-cluster --timeout 60 >&2
PIDS="alpha=${PID[alpha]},beta=${PID[beta]},gamma=${PID[gamma]}"
echo "$PIDS" >"$W/res/pids"

DISK_SIZE_BYTES=""
mkdisk() { # path: fallocate BENCH_SIZE (zeros)
    fallocate -l "$BENCH_SIZE" "$1"
    DISK_SIZE_BYTES="$(stat -c %s "$1")"
}
for n in "${NODES[@]}"; do mkdisk "$W/disks/$n-r0.img"; done
SIZE_BYTES="$DISK_SIZE_BYTES"
FSTYPE="$(df -T "$W" | awk 'NR==2{print $2}')"
# The block device under the work directory (none on tmpfs), for its traffic per row.
BENCH_BLOCKDEV="$(df --output=source "$W" | awk 'NR==2{print $1}')"
BENCH_BLOCKDEV="$(basename "$BENCH_BLOCKDEV")"
export BENCH_BLOCKDEV
say "work dir $W ($FSTYPE, $(free_gib) GiB free), device size $SIZE_BYTES bytes, ${BENCH_RUNTIME}s per row"
# The device's own sequential write speed, in this run (1 MiB direct writes, 512 MiB):
# rows near it are bound by the device, rows far below it by our code or the CPU.
dd_speed() {
    dd if=/dev/zero of="$W/dd.test" bs=1M count=512 oflag=direct conv=fsync 2>&1 |
        awk '/copied/{for(i=1;i<=NF;i++) if($i=="copied,") {print $(i+3), $(i+4)}}'
    rm -f "$W/dd.test"
}
DD_START="$(dd_speed)"
say "device: dd oflag=direct 1 MiB writes: $DD_START"

adm alpha create-resource r0 "$W/disks/alpha-r0.img" >&2
adm alpha wait-resource r0 primary --timeout 30 >&2
URI="nbd://127.0.0.1:${NBD[alpha]}/r0"

reset_hwm() { for n in "${NODES[@]}"; do echo 5 >"/proc/${PID[$n]}/clear_refs" 2>/dev/null || true; done; }
HWM_RESET=1
echo 5 >"/proc/${PID[alpha]}/clear_refs" 2>/dev/null || HWM_RESET=0
phase_hwm() { H hwm "$W/res/hwm-$1.json" "$PIDS"; reset_hwm; }

# Between rows: let every member replay/write back everything, rotate and delete what all
# members replayed on the primary, so each row starts with nothing pending. Not timed.
wait_uptodate() { # resource, seconds (in steps that stay under marsadm's 300 s reply timeout)
    local res="$1" left="$2" step
    while ((left > 0)); do
        step=$((left < 240 ? left : 240))
        adm alpha wait-resource "$res" uptodate --timeout "$step" >/dev/null 2>&1 && return 0
        left=$((left - step))
    done
    die "$res not uptodate after $2 s: $(adm alpha view "$res")"
}
settle() {
    wait_uptodate r0 600
    adm alpha log-rotate r0 >/dev/null 2>&1 || true
    sleep 2.5 # applied position persisted (1 s) and the members' replayed positions gossiped
    adm alpha log-delete r0 >/dev/null 2>&1 || true
    check_space
}

# ------------------------------------------------------------------ 1. throughput with 0, 1, 2 secondaries
FIO_COMMON="--ioengine=nbd --numjobs=1 --time_based --runtime=$BENCH_RUNTIME --size=$SIZE_BYTES --randrepeat=0 --output-format=json"
ROW_NAMES=(seqwrite)
[[ "$BENCH_RAND" == 1 ]] && ROW_NAMES+=(randwrite)
declare -A ROW_ARGS=(
    [seqwrite]="--rw=write --bs=1M --iodepth=8"
    [randwrite]="--rw=randwrite --bs=4k --iodepth=32 --fsync=32"
)
run_fio() { # result stem, fio args...
    local stem="$W/res/$1"
    shift
    H runfio "$stem.cpu.json" "$PIDS" fio --name=bench "$@" --uri="$URI" --output="$stem.json" \
        >"$stem.err" 2>&1 || die "fio $(basename "$stem") failed: $(cat "$stem.err")"
}

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
if [[ "$BENCH_ONLY" != sync ]]; then
# Untimed prefill: alpha's disk gets written once, so no configuration writes into unwritten
# (fallocated) extents; the secondaries' disks are written whole by their full sync.
say "prefill r0 (one sequential 1 MiB pass, untimed)"
fio --name=prefill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 --size="$SIZE_BYTES" \
    --output-format=json --output="$W/res/prefill.json" >"$W/res/prefill.err" 2>&1 \
    || die "fio prefill failed: $(cat "$W/res/prefill.err")"

reset_hwm
for cfg in 0 1 2; do
    case $cfg in
        1) joiner=beta ;;
        2) joiner=gamma ;;
        *) joiner="" ;;
    esac
    if [[ -n "$joiner" ]]; then
        say "join-resource r0 on $joiner (full sync of $SIZE_BYTES bytes, untimed)"
        for ((i = 0; i < 300; i++)); do adm "$joiner" view r0 >/dev/null 2>&1 && break; sleep 0.1; done
        adm "$joiner" join-resource r0 "$W/disks/$joiner-r0.img" >&2
        wait_uptodate r0 900
    fi
    [[ "$BENCH_ONLY" == catchup ]] && continue
    for row in "${ROW_NAMES[@]}"; do
        for ((rep = 1; rep <= BENCH_REPEAT; rep++)); do
            settle
            say "throughput: $row with $cfg secondaries, run $rep/$BENCH_REPEAT (${BENCH_RUNTIME}s)"
            # shellcheck disable=SC2086
            run_fio "tp-$cfg-$row-$rep" $FIO_COMMON ${ROW_ARGS[$row]}
        done
    done
    phase_hwm "tp-$cfg"
done

# ------------------------------------------------------------------ 2. lag at 80 % of the 0-secondary peak, 2 secondaries
if [[ "$BENCH_ONLY" != catchup ]]; then
PEAK0="$(python3 - "$W/res" "$BENCH_REPEAT" <<'EOF'
import json, statistics, sys
d, n = sys.argv[1], int(sys.argv[2])
print(int(statistics.median(json.load(open(f"{d}/tp-0-seqwrite-{r}.json"))["jobs"][0]["write"]["bw_bytes"] for r in range(1, n + 1))))
EOF
)"
RATE80=$((PEAK0 * 8 / 10))
settle
say "lag: 1 MiB writes at $((RATE80 / 1048576)) MiB/s (80 % of $((PEAK0 / 1048576)) MiB/s) with 2 secondaries, ${BENCH_RUNTIME}s"
rm -f "$W/res/lag.stop"
H lag "$W/res/lag-samples.jsonl" "$W/res/lag.stop" 0.1 r0 "$W/alpha" alpha "beta=$W/beta" "gamma=$W/gamma" &
LAG_PID=$!
sleep 0.5
# shellcheck disable=SC2086
run_fio lag $FIO_COMMON --rw=write --bs=1M --iodepth=8 --rate="$RATE80"
touch "$W/res/lag.stop"
wait "$LAG_PID" || die "lag sampler failed"
LAG_PID=""
phase_hwm lag
fi

# ------------------------------------------------------------------ 3. catch-up on beta after pause-fetch / pause-replay
catchup() { # fetch|replay
    local kind="$1" w
    settle
    adm beta "pause-$kind" r0 >&2
    say "catch-up ($kind): writing $CATCHUP_BYTES bytes on alpha while beta's $kind is paused"
    H cpusnap "$W/res/catchup-$kind-write.a.json" "$PIDS"
    fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 --size="$SIZE_BYTES" \
        --io_size="$CATCHUP_BYTES" --end_fsync=1 --output-format=json --output="$W/res/catchup-$kind-write.json" \
        >"$W/res/catchup-$kind-write.err" 2>&1 || die "fio fill failed: $(cat "$W/res/catchup-$kind-write.err")"
    H cpusnap "$W/res/catchup-$kind-write.b.json" "$PIDS"
    w="$(H written "$W/alpha" r0 alpha)"
    if [[ $kind == replay ]]; then # let fetch bring everything over first (untimed)
        H wait-field "$W/beta" r0 beta fetched "$w" 600
    fi
    # The timed window holds beta's work alone, as on a machine of its own: gamma has
    # replayed the backlog and every node's dirty page cache (alpha's and gamma's disks)
    # is written back before the resume (BENCH_CATCHUP_SETTLE=0: resume right away).
    if [[ "$BENCH_CATCHUP_SETTLE" == 1 ]]; then
        H wait-field "$W/gamma" r0 gamma replayed "$w" 600
        sync
    fi
    say "catch-up ($kind): resume-$kind on beta, waiting for replayed >= $w"
    H catchup "$W/res/catchup-$kind.json" "$PIDS" "$W/beta" r0 beta "$kind" "$w" 900
}
reset_hwm
catchup fetch
catchup replay
phase_hwm catchup
fi # BENCH_ONLY

# ------------------------------------------------------------------ 4. full sync of r1: equal disk (beta), different disk (gamma)
if [[ "$BENCH_ONLY" != catchup ]]; then
settle
say "full sync: preparing r1 ($SIZE_BYTES bytes of random data on alpha; beta gets a copy, gamma other random data)"
head -c "$SIZE_BYTES" /dev/urandom >"$W/disks/alpha-r1.img"
cp "$W/disks/alpha-r1.img" "$W/disks/beta-r1.img"
head -c "$SIZE_BYTES" /dev/urandom >"$W/disks/gamma-r1.img"
sync -f "$W/disks/alpha-r1.img"
adm alpha create-resource r1 "$W/disks/alpha-r1.img" >&2
adm alpha wait-resource r1 primary --timeout 30 >&2
for n in beta gamma; do # joiners must know r1
    for ((i = 0; i < 300; i++)); do adm "$n" view r1 >/dev/null 2>&1 && break; sleep 0.1; done
done
reset_hwm
say "full sync: beta joins r1 with an equal disk"
H sync "$W/res/sync-equal.json" "$PIDS" "$W/beta" r1 beta "$W/disks/beta-r1.img" "$W/alpha" 900
say "full sync: gamma joins r1 with a different disk"
H sync "$W/res/sync-different.json" "$PIDS" "$W/gamma" r1 gamma "$W/disks/gamma-r1.img" "$W/alpha" 900
cmp -s "$W/disks/alpha-r1.img" "$W/disks/beta-r1.img" && echo equal >"$W/res/cmp-beta" || echo DIFFERENT >"$W/res/cmp-beta"
cmp -s "$W/disks/alpha-r1.img" "$W/disks/gamma-r1.img" && echo equal >"$W/res/cmp-gamma" || echo DIFFERENT >"$W/res/cmp-gamma"
phase_hwm sync
fi
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"
DD_END="$(dd_speed)"

# ------------------------------------------------------------------ space used by the node directories
for n in "${NODES[@]}"; do echo "$n $(du -sb "$W/$n" | awk '{print $1}')"; done >"$W/res/du"
adm alpha view r0 --json >"$W/res/view-end-r0.json" || true

# ------------------------------------------------------------------ report
FIO_VER="$(fio --version)"
CPU_MODEL="$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo) ($(nproc) CPUs)"
MEM_TOTAL="$(awk '/^MemTotal:/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
GIT_REV="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && git diff --quiet HEAD 2>/dev/null || echo '+dirty')"

REPORT="$(W="$W" CMDLINE="$CMDLINE" FIO_VER="$FIO_VER" CPU_MODEL="$CPU_MODEL" MEM_TOTAL="$MEM_TOTAL" \
    FSTYPE="$FSTYPE" DD_START="$DD_START" DD_END="$DD_END" SIZE_BYTES="$SIZE_BYTES" RUNTIME="$BENCH_RUNTIME" REPEAT="$BENCH_REPEAT" \
    GIT_REV="$GIT_REV" KERNEL="$(uname -r)" DATE="$(date -u '+%Y-%m-%d %H:%M:%S UTC')" NCPU="$(nproc)" \
    LOAD_START="$LOAD_START" ONLY="$BENCH_ONLY" LOAD_END="$LOAD_END" ROWS="${ROW_NAMES[*]}" RATE80="$RATE80" \
    FIO_COMMON="$FIO_COMMON" HWM_RESET="$HWM_RESET" CATCHUP_BYTES="$CATCHUP_BYTES" CATCHUP_SETTLE="$BENCH_CATCHUP_SETTLE" \
    python3 - <<'EOF'
import json, os, statistics
e = os.environ
W, R = e["W"], e["W"] + "/res"
REPEAT, NCPU = int(e["REPEAT"]), int(e["NCPU"])
rows = e["ROWS"].split()
def jl(p): return json.load(open(f"{R}/{p}"))
MiB = 2**20
out, cpu_rows, verdicts = [], [], []
def verdict(ok): verdicts.append(ok); return "met" if ok else "MISSED"
def cpu_row(label, c):
    w = c["wall"]
    m = c["marsd_cpu"]
    d = c.get("device")
    dev = (f"{d['read_bytes'] / w / 1e6:,.0f} / {d['written_bytes'] / w / 1e6:,.0f} / {min(100.0, d['busy_s'] / w * 100):.0f} %"
           if d else "-")
    cpu_rows.append(f"| {label} | {m['alpha'] / w:.2f} | {m['beta'] / w:.2f} | {m['gamma'] / w:.2f} | {c['other_cpu'] / w:.2f} | {dev} |")

table = []
per_gib = {}
ONLY_SYNC = e["ONLY"] == "sync"
ONLY_CATCHUP = e["ONLY"] == "catchup"
# 1. throughput
def tp(cfg, row):
    vals, cpus = [], []
    for r in range(1, REPEAT + 1):
        j = jl(f"tp-{cfg}-{row}-{r}.json")["jobs"][0]
        if j.get("error"):
            raise SystemExit(f"fio error {j['error']} in tp-{cfg}-{row}-{r}")
        vals.append(j["write"]["bw_bytes"] / MiB if row == "seqwrite" else j["write"]["iops"])
        cpus.append(jl(f"tp-{cfg}-{row}-{r}.cpu.json"))
    return statistics.median(vals), vals, cpus[len(cpus) // 2]
for row in ([] if ONLY_SYNC or ONLY_CATCHUP else rows):
    unit = "MiB/s" if row == "seqwrite" else "IOPS"
    label = "1 MiB seq write, QD8" if row == "seqwrite" else "4 KiB rand write, QD32, fsync=32"
    base = tp(0, row)
    for cfg in (0, 1, 2):
        v, runs, c = tp(cfg, row)
        ratio = v / base[0] if base[0] else 0
        runs_s = (" (runs: " + ", ".join(f"{x:,.0f}" for x in runs) + ")") if REPEAT > 1 else ""
        if cfg == 0:
            tgt, ver = "(baseline)", ""
        elif cfg == 2:
            tgt, ver = ">= 90 % of 0 sec.", verdict(ratio >= 0.9)
        else:
            tgt, ver = "", ""
        table.append(f"| {label}, {cfg} secondar{'y' if cfg == 1 else 'ies'} ({unit}) | {v:,.1f}{runs_s} | {ratio * 100:.0f} % | {tgt} | {ver} |")
        cpu_row(f"{label}, {cfg} sec.", c)
        # The primary's own CPU seconds per GiB written (median run's CPU, its bytes).
        runs_j = [jl(f"tp-{cfg}-{row}-{r}.json")["jobs"][0] for r in range(1, REPEAT + 1)]
        gib = statistics.median(j["write"]["io_bytes"] for j in runs_j) / 2**30
        per_gib[(row, cfg)] = c["marsd_cpu"]["alpha"] / gib if gib > 0 else 0.0
for row in ([] if ONLY_SYNC or ONLY_CATCHUP else rows):
    label = "1 MiB seq write" if row == "seqwrite" else "4 KiB rand write"
    a0, a2 = per_gib[(row, 0)], per_gib[(row, 2)]
    r = a2 / a0 if a0 else 0
    table.append(f"| primary's CPU per GiB written, {label}: 0 / 1 / 2 secondaries (CPU s/GiB) | {a0:.2f} / {per_gib[(row, 1)]:.2f} / {a2:.2f} | {r:.2f}x | <= 1.2x | {verdict(r <= 1.2)} |")

# 2. catch-up
for kind, label in (() if ONLY_SYNC else (("fetch", "catch-up after pause-fetch (fetch + replay)"), ("replay", "catch-up after pause-replay (replay only)"))):
    c = jl(f"catchup-{kind}.json")
    rate = c["bytes"] / c["elapsed"] if c["elapsed"] > 0 else 0
    table.append(f"| {label}: {c['bytes'] / MiB:,.0f} MiB in {c['elapsed']:.2f} s (MB/s) | {rate / 1e6:,.0f} | | >= 1,000 MB/s | {verdict(rate >= 1e9)} |")
    cpu_row(f"catch-up ({kind})", c)

# 3. sync
for kind, label, tgt in (() if ONLY_CATCHUP else (("equal", "full sync, equal disks", 2e9), ("different", "full sync, different disks", 1e9))):
    s = jl(f"sync-{kind}.json")
    size = int(e["SIZE_BYTES"])
    rate = size / s["elapsed"] if s["elapsed"] > 0 else 0
    table.append(f"| {label}: {size / 2**30:g} GiB in {s['elapsed']:.2f} s, {s['blocks_transferred']:,} blocks transferred (MB/s) | {rate / 1e6:,.0f} | | >= {tgt / 1e6:,.0f} MB/s | {verdict(rate >= tgt)} |")
    cpu_row(f"full sync ({kind})", s)

# 4. lag
lag_detail = []
if not ONLY_SYNC and not ONLY_CATCHUP:
    samples = [json.loads(l) for l in open(f"{R}/lag-samples.jsonl")]
    lagfio = jl("lag.json")["jobs"][0]["write"]["bw_bytes"]
    lc = jl("lag.cpu.json")
    t_end = lc["wall"] + 0.5  # the sampler started 0.5 s before fio
    errors = sum(1 for s in samples if "error" in s)
    def pct(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")
    for n in ("beta", "gamma"):
        ls = [s[n]["lag_seconds"] for s in samples if n in s]
        lb = [s[n]["lag_bytes"] for s in samples if n in s]
        pls = [s[n]["p_lag_seconds"] for s in samples if n in s]
        true_b = [max(0, s["written"] - s[n]["replayed"]) for s in samples if n in s]
        mx = max(ls) if ls else float("nan")
        table.append(f"| lag of {n} at {int(e['RATE80']) / MiB:,.0f} MiB/s asked (80 %), {lagfio / MiB:,.0f} MiB/s reached, 2 sec.: lag_seconds p50 / p99 / max (s) | {pct(ls, 50):.2f} / {pct(ls, 99):.2f} / {mx:.2f} | | max < 1 s | {verdict(mx < 1.0)} |")
        table.append(f"| lag of {n}: lag_bytes p50 / p99 / max (MiB) | {pct(lb, 50) / MiB:,.1f} / {pct(lb, 99) / MiB:,.1f} / {max(lb) / MiB if lb else 0:,.1f} | | | |")
        lag_detail.append(f"{n}: {len(ls)} samples; as the primary's view shows it: lag_seconds max {max(pls) if pls else 0:.2f} s;"
                          f" alpha's written minus {n}'s own replayed, sampled one after the other: p99 {pct(true_b, 99) / MiB:,.1f} MiB, max {max(true_b) / MiB if true_b else 0:,.1f} MiB")
    cpu_row("lag row (80 % rate)", lc)

# RSS
hw = {p: jl(f"hwm-{p}.json") for p in ("tp-0", "tp-1", "tp-2", "lag", "catchup", "sync") if os.path.exists(f"{R}/hwm-{p}.json")}
hw_rows = [f"| {p} | " + " | ".join(f"{hw[p][n] / 1024:,.0f}" for n in ("alpha", "beta", "gamma")) + " |" for p in hw]

du = dict(l.split() for l in open(f"{R}/du"))
size_gib = int(e["SIZE_BYTES"]) / 2**30
out.append("# mars replication benchmark (3 marsd on 127.0.0.1)")
out.append("")
out.append(f"Result: {'all targets met' if all(verdicts) else str(verdicts.count(False)) + ' of ' + str(len(verdicts)) + ' targets MISSED'}."
           + (f" Median of {REPEAT} runs per throughput row." if REPEAT > 1 else " One run per row."))
out.append("")
out.append("| row | value | of 0 sec. | target | |")
out.append("|---|---:|---:|---|---|")
out += table
out.append("")
out.append(f"CPU during each row, in CPUs busy (of {NCPU}): each marsd, and everything else except the client"
           " (fio, or the `marsadm` polls and commands of the catch-up and sync rows). Kernel threads working"
           " for the daemons (page-cache flushers, loopback softirq) land in 'other', as does unrelated work on a shared machine."
           f" Device: the traffic of the block device under the work directory ({os.environ.get('BENCH_BLOCKDEV') or 'none'},"
           " shared by all three nodes, from /proc/diskstats), and the share of the row's time it had I/O in flight.")
out.append("")
out.append("| row | alpha (primary) | beta | gamma | other | device read / written (MB/s) / busy |")
out.append("|---|---:|---:|---:|---:|---:|")
out += cpu_rows
out.append("")
out.append("Peak RSS (VmHWM, MiB) of each marsd per phase"
           + (" (reset with clear_refs at the start of each phase)" if e["HWM_RESET"] == "1" else " (cumulative: clear_refs not permitted)") + ":")
out.append("")
out.append("| phase | alpha | beta | gamma |")
out.append("|---|---:|---:|---:|")
out += hw_rows
out.append("")
out.append(f"- date: {e['DATE']}; mars commit {e['GIT_REV']}")
out.append(f"- kernel: {e['KERNEL']}; CPU: {e['CPU_MODEL']}; memory: {e['MEM_TOTAL']}; load average at start {e['LOAD_START']}, at end {e['LOAD_END']}")
out.append(f"- the device's own speed in this run (`dd if=/dev/zero bs=1M count=512 oflag=direct conv=fsync` in the work directory): {e['DD_START']} at the start, {e['DD_END']} at the end; a row near it is bound by the device, far below it by CPU or our code")
out.append(f"- {e['FIO_VER']}; r0 and r1: {size_gib:g} GiB disk files per node (r0: `fallocate -l`), all on one {e['FSTYPE']} filesystem; default node settings for all three nodes")
out.append(f"- command: `{e['CMDLINE'].strip()}`")
if not ONLY_SYNC and not ONLY_CATCHUP:
    out.append(f"- throughput: `fio --name=bench {e['FIO_COMMON']} ROWARGS --uri=nbd://127.0.0.1:PORT/r0` against alpha;"
               " before every run all members are waited for (`wait-resource r0 uptodate`), the log is rotated and"
               " replayed logfiles deleted on alpha (untimed)")
    out.append(f"- lag: the same fio with `--rw=write --bs=1M --iodepth=8 --rate={e['RATE80']}` (achieved {lagfio / MiB:,.0f} MiB/s);"
               f" every 100 ms `marsadm view r0 --json` on alpha, beta and gamma; values from each secondary's own view"
               f" ({len(samples)} samples, {errors} failed). " + "; ".join(lag_detail))
if not ONLY_SYNC:
    cf, cr = jl("catchup-fetch.json"), jl("catchup-replay.json")
    def phases(c):  # (first poll with fetched at the target, last poll before replayed moved)
        t_f = next((x[0] for x in c["samples"] if x[1] >= c["target"]), None)
        t_r = max((x[0] for x in c["samples"] if x[2] <= c["start_replayed"]), default=0.0)
        return t_f, t_r
    tf, tr = phases(cf)
    out.append(f"- catch-up: beta paused, {int(e['CATCHUP_BYTES']) / MiB:,.0f} MiB written with fio (1 MiB, QD8, end_fsync);"
               " timed from `resume-fetch`/`resume-replay` until beta's own `log.replayed` reaches alpha's `log.written`"
               f" (polled every 50 ms: {cf['polls']} / {cr['polls']} polls); with pause-replay, fetch had brought everything over before the resume."
               + (" Before each resume gamma had replayed the backlog and `sync` had written back every node's dirty pages"
                  " (alpha's and gamma's disks), so the timed window holds beta's work alone, as on a machine of its own."
                  if e.get("CATCHUP_SETTLE") == "1" else
                  " Resumed right after the write (BENCH_CATCHUP_SETTLE=0): gamma's replay and alpha's and gamma's disk"
                  " writeback of the backlog share the timed window and the device.")
               + f" After resume-fetch, beta's view showed the whole backlog fetched at {tf if tf is not None else float('nan'):.2f} s and replayed still"
               f" at its start position at {tr:.2f} s (its `log.fetched` moves once per fetch round)")
if not ONLY_CATCHUP:
  se, sd = jl("sync-equal.json"), jl("sync-different.json")
  out.append(f"- full sync: r1 created on alpha over {size_gib:g} GiB of /dev/urandom data; beta's disk a `cp` of it, gamma's other"
           " random data; timed from `join-resource` until the joiner's own view shows `sync: null` and `disk: uptodate`."
           f" Disks after sync: beta {open(R + '/cmp-beta').read().strip()}, gamma {open(R + '/cmp-gamma').read().strip()} (cmp with alpha's)."
           f" The joiner reported sync rates of {(se['view_rate_last'] or 0) / 1e6:,.0f} / {(sd['view_rate_last'] or 0) / 1e6:,.0f} MB/s (last view sample)."
           " All disk files are in the page cache (the machine has more RAM than the data).")
out.append(f"- node directories at the end (logs): alpha {int(du['alpha']) / 2**30:.1f} GiB, beta {int(du['beta']) / 2**30:.1f} GiB, gamma {int(du['gamma']) / 2**30:.1f} GiB")
out.append("- every member's log and disk share one virtio disk and two CPUs with fio and the other members: with 2"
           " secondaries the machine does three nodes' work; numbers are loopback numbers, not network ones")
print("\n".join(out))
EOF
)"
mkdir -p "$(dirname "$BENCH_OUT")"
printf '%s\n' "$REPORT" >"$BENCH_OUT"
printf '%s\n' "$REPORT"
say "written to $BENCH_OUT"
