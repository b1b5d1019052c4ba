#!/usr/bin/env bash
# bench/run.sh: mars (marsd over NBD) against the reference qemu-nbd, side by side, one run.
#
# Both servers run at the same time on 127.0.0.1, each on its own disk file of the same
# size, prepared the same way (fallocate), in the same directory (same filesystem).
# fio (ioengine=nbd) drives one server at a time; for every row qemu-nbd and mars are
# measured back to back. Results go to stdout and to $BENCH_OUT as a markdown table.
#
# Environment:
#   BENCH_DIR      work directory (default: a new mktemp -d, removed at exit)
#   BENCH_SIZE     device size, anything fallocate -l takes (default 1G)
#   BENCH_RUNTIME  seconds per fio row (default 20)
#   BENCH_OUT      markdown output (default bench/results.md)
#   BENCH_REPEAT   measure every row this many times, alternating which server goes first;
#                  the table shows the median (default 1)
#   BENCH_KEEP=1   keep the work directory (logs, fio JSON) at exit
#   BENCH_NO_BUILD=1  skip cargo build (use the binaries already in target/release)
#   BENCH_ROWS     rows to measure (default "seqwrite randwrite randread"); the table
#                  shows only those
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_SIZE="${BENCH_SIZE:-1G}"
BENCH_RUNTIME="${BENCH_RUNTIME:-20}"
BENCH_REPEAT="${BENCH_REPEAT:-1}"
BENCH_OUT="${BENCH_OUT:-$ROOT/bench/results.md}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
CMDLINE="BENCH_SIZE=$BENCH_SIZE BENCH_RUNTIME=$BENCH_RUNTIME BENCH_REPEAT=$BENCH_REPEAT $(printf '%q ' "$0" "$@")"

die() { echo "bench: $*" >&2; exit 1; }
say() { echo "bench: $*" >&2; }
[[ "$BENCH_REPEAT" =~ ^[1-9][0-9]*$ ]] || die "BENCH_REPEAT must be a positive integer"

# ------------------------------------------------------------------ prerequisites
for t in fio qemu-nbd python3 fallocate cargo; do
    command -v "$t" >/dev/null || die "$t not found (apt-get install fio qemu-utils python3 util-linux; cargo from rustup)"
done
if ! fio --enghelp=nbd >/dev/null 2>&1; then
    die "this fio has no 'nbd' ioengine: install the Debian package 'fio' built with libnbd (apt-get install fio libnbd0)"
fi
qemu-nbd --help | grep -q -- '--aio=' || die "qemu-nbd lacks --aio (qemu-utils too old)"

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
    BENCH_DIR="$(mktemp -d /tmp/mars-bench.XXXXXX)"
    CREATED_DIR=1
fi
mkdir -p "$BENCH_DIR"
W="$(cd "$BENCH_DIR" && pwd)"
[[ -e "$W/node" || -e "$W/mars.img" || -e "$W/qemu.img" ]] && die "$W already holds a previous run; use an empty BENCH_DIR"

MARSD_PID=""
QEMU_PID=""
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
    stop_pid "$QEMU_PID" qemu-nbd 10
    stop_pid "$MARSD_PID" marsd 120
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

# ------------------------------------------------------------------ ports (127.0.0.1 only)
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
port_open() {
    python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.settimeout(0.5)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}
MARS_PEER_PORT="$(free_port)"
MARS_NBD_PORT="$(free_port)"
QEMU_PORT="$(free_port)"
while [[ "$MARS_NBD_PORT" == "$MARS_PEER_PORT" ]]; do MARS_NBD_PORT="$(free_port)"; done
while [[ "$QEMU_PORT" == "$MARS_PEER_PORT" || "$QEMU_PORT" == "$MARS_NBD_PORT" ]]; do QEMU_PORT="$(free_port)"; done

# ------------------------------------------------------------------ disks: same preparation for both
fallocate -l "$BENCH_SIZE" "$W/qemu.img"
fallocate -l "$BENCH_SIZE" "$W/mars.img"
SIZE_BYTES="$(stat -c %s "$W/qemu.img")"
FSTYPE="$(df -T "$W" | awk 'NR==2{print $2}')"
say "work dir $W ($FSTYPE), device size $SIZE_BYTES bytes, runtime ${BENCH_RUNTIME}s per row"

# ------------------------------------------------------------------ reference: qemu-nbd
QEMU_AIO=""
QEMU_CMD=()
for aio in native io_uring threads; do
    QEMU_CMD=(qemu-nbd --cache=none --aio="$aio" --format=raw --persistent --shared=8
        -b 127.0.0.1 -p "$QEMU_PORT" -x r0 "$W/qemu.img")
    "${QEMU_CMD[@]}" >"$W/qemu-nbd.log" 2>&1 &
    QEMU_PID=$!
    for _ in $(seq 100); do
        port_open "$QEMU_PORT" && break
        kill -0 "$QEMU_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$QEMU_PID" 2>/dev/null && port_open "$QEMU_PORT"; then
        QEMU_AIO="$aio"
        break
    fi
    say "qemu-nbd refused --aio=$aio: $(tr '\n' ' ' <"$W/qemu-nbd.log")"
    stop_pid "$QEMU_PID" qemu-nbd 5
    QEMU_PID=""
done
[[ -n "$QEMU_AIO" ]] || die "qemu-nbd would not start with any --aio mode (see above)"
[[ "$QEMU_AIO" == native ]] || say "NOTE: --aio=native was refused on $FSTYPE; qemu-nbd uses --aio=$QEMU_AIO"

# ------------------------------------------------------------------ ours: marsd
"$MARSADM" --dir "$W/node" create-cluster --node alpha \
    --listen "127.0.0.1:$MARS_PEER_PORT" --nbd "127.0.0.1:$MARS_NBD_PORT" >&2
MARS_LOG=warn "$MARSD" --dir "$W/node" 2>"$W/marsd.log" &
MARSD_PID=$!
for _ in $(seq 100); do
    [[ -S "$W/node/marsd.sock" ]] && break
    kill -0 "$MARSD_PID" 2>/dev/null || die "marsd exited at start: $(cat "$W/marsd.log")"
    sleep 0.1
done
"$MARSADM" --dir "$W/node" create-resource r0 "$W/mars.img" >&2
"$MARSADM" --dir "$W/node" wait-resource r0 primary --timeout 30 >&2
port_open "$MARS_NBD_PORT" || die "marsd does not listen on 127.0.0.1:$MARS_NBD_PORT"

# Between rows: let mars write everything back and drop applied logfiles, so each row
# starts with nothing pending (qemu-nbd has no pending state either) and the log does
# not fill the filesystem. Not timed.
mars_settle() {
    "$MARSADM" --dir "$W/node" wait-resource r0 uptodate --timeout 300 >/dev/null 2>&1 \
        || say "warning: mars r0 not written back after 300 s"
    "$MARSADM" --dir "$W/node" log-rotate r0 >/dev/null 2>&1 || true
    sleep 1.5 # persist_interval is 1 s: let the applied position reach disk
    "$MARSADM" --dir "$W/node" log-delete r0 >/dev/null 2>&1 || true
}

# ------------------------------------------------------------------ fio
uri_of() { case "$1" in mars) echo "nbd://127.0.0.1:$MARS_NBD_PORT/r0" ;; qemu) echo "nbd://127.0.0.1:$QEMU_PORT/r0" ;; esac; }

read -ra ROW_NAMES <<<"${BENCH_ROWS:-seqwrite randwrite randread}"
for row in "${ROW_NAMES[@]}"; do
    [[ $row =~ ^(seqwrite|randwrite|randread)$ ]] || die "unknown row '$row' in BENCH_ROWS (seqwrite, randwrite, randread)"
done
declare -A ROW_ARGS=(
    [seqwrite]="--rw=write --bs=1M --iodepth=8"
    [randwrite]="--rw=randwrite --bs=4k --iodepth=32 --fsync=32"
    [randread]="--rw=randread --bs=4k --iodepth=32"
)
FIO_COMMON="--ioengine=nbd --numjobs=1 --time_based --runtime=$BENCH_RUNTIME --size=$SIZE_BYTES --randrepeat=0 --output-format=json"

# fio runs under a small wrapper that also records CPU time during the run: fio's own
# (rusage of the child), the server's (/proc/PID/stat) and the whole machine's (/proc/stat),
# so that CPU taken by unrelated processes on a shared machine shows up in the report.
cat >"$W/runfio.py" <<'PYEOF'
import json, os, resource, subprocess, sys, time
out, server_pid, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
tck = os.sysconf("SC_CLK_TCK")
def busy():
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / tck  # all but idle and iowait
def proc_cpu(pid):
    s = open(f"/proc/{pid}/stat").read()
    f = s[s.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / tck
b0, s0, t0 = busy(), proc_cpu(server_pid), time.time()
rc = subprocess.call(cmd)
b1, s1, t1 = busy(), proc_cpu(server_pid), time.time()
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
fio_cpu = ru.ru_utime + ru.ru_stime
json.dump({"wall": t1 - t0, "server_cpu": s1 - s0, "fio_cpu": fio_cpu,
           "other_cpu": max(0.0, (b1 - b0) - (s1 - s0) - fio_cpu)}, open(out, "w"))
sys.exit(rc)
PYEOF

run_fio() { # side, name (file stem), extra args (--ioengine must precede the engine option --uri)
    local side="$1" name="$2" pid
    shift 2
    case "$side" in mars) pid="$MARSD_PID" ;; qemu) pid="$QEMU_PID" ;; esac
    local stem="$W/fio-$name-$side"
    python3 "$W/runfio.py" "$stem.cpu.json" "$pid" \
        fio --name="${name%%.*}" "$@" --uri="$(uri_of "$side")" --output="$stem.json" >"$stem.err" 2>&1 \
        || die "fio $name on $side failed: $(cat "$stem.err")"
}

prefill() { # side
    say "prefill $1 (sequential 1 MiB writes over the whole device)"
    # shellcheck disable=SC2086
    run_fio "$1" prefill --ioengine=nbd --numjobs=1 --rw=write --bs=1M --iodepth=8 \
        --size="$SIZE_BYTES" --output-format=json
}

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
for ((rep = 1; rep <= BENCH_REPEAT; rep++)); do
    if ((rep % 2)); then order=(qemu mars); else order=(mars qemu); fi
    for row in "${ROW_NAMES[@]}"; do
        if [[ $row == randread && $rep == 1 ]]; then
            # Reads need data: prefill both disks once.
            prefill qemu
            prefill mars
        fi
        for side in "${order[@]}"; do
            [[ $side == mars ]] && mars_settle
            say "row $row on $side, run $rep/$BENCH_REPEAT (${BENCH_RUNTIME}s)"
            # shellcheck disable=SC2086
            run_fio "$side" "$row.$rep" $FIO_COMMON ${ROW_ARGS[$row]}
        done
    done
done
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"

# ------------------------------------------------------------------ peak RSS (before stopping)
hwm_kib() { awk '/^VmHWM:/{print $2}' "/proc/$1/status"; }
MARS_HWM="$(hwm_kib "$MARSD_PID")"
QEMU_HWM="$(hwm_kib "$QEMU_PID")"
MARS_LOG_BYTES="$(du -sb "$W/node" | awk '{print $1}')"

# ------------------------------------------------------------------ report
FIO_VER="$(fio --version)"
QEMU_VER="$(qemu-nbd --version | head -1)"
CPU_MODEL="$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo) ($(nproc) CPUs)"
MEM_TOTAL="$(awk '/^MemTotal:/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
GIT_REV="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && git diff --quiet HEAD 2>/dev/null || echo '+dirty')"

REPORT="$(W="$W" MARS_HWM="$MARS_HWM" QEMU_HWM="$QEMU_HWM" QEMU_AIO="$QEMU_AIO" \
    CMDLINE="$CMDLINE" FIO_VER="$FIO_VER" QEMU_VER="$QEMU_VER" CPU_MODEL="$CPU_MODEL" \
    MEM_TOTAL="$MEM_TOTAL" FSTYPE="$FSTYPE" SIZE_BYTES="$SIZE_BYTES" RUNTIME="$BENCH_RUNTIME" \
    GIT_REV="$GIT_REV" KERNEL="$(uname -r)" DATE="$(date -u '+%Y-%m-%d %H:%M:%S UTC')" \
    QEMU_CMD="${QEMU_CMD[*]}" FIO_COMMON="$FIO_COMMON" MARS_LOG_BYTES="$MARS_LOG_BYTES" \
    REPEAT="$BENCH_REPEAT" ROWS="${ROW_NAMES[*]}" LOAD_START="$LOAD_START" LOAD_END="$LOAD_END" NCPU="$(nproc)" \
    ARGS_SEQ="${ROW_ARGS[seqwrite]}" ARGS_RW="${ROW_ARGS[randwrite]}" ARGS_RR="${ROW_ARGS[randread]}" \
    python3 - <<'EOF'
import json, os
W = os.environ["W"]
e = os.environ

import statistics
REPEAT = int(e["REPEAT"])

def job(row, side, rep):
    with open(f"{W}/fio-{row}.{rep}-{side}.json") as f:
        return json.load(f)["jobs"][0]

def cpu(row, side, rep):
    with open(f"{W}/fio-{row}.{rep}-{side}.cpu.json") as f:
        return json.load(f)

def ratio(m, q):
    return f"{m / q:.2f}x" if q else "n/a"

rows = []
verdicts = []
# (row, label, direction, metric, target ratio)
spec = [
    ("seqwrite", "1 MiB seq write, QD8 (MiB/s)", "write", "bw", 1.0),
    ("randwrite", "4 KiB rand write, QD32, fsync=32 (IOPS)", "write", "iops", 1.5),
    ("randread", "4 KiB rand read, QD32, prefilled (IOPS)", "read", "iops", 1.0),
]
flush_note = []
cpu_rows = []
for row, label, d, metric, target in spec:
    if row not in e["ROWS"].split():
        continue
    vals = {}
    for side in ("mars", "qemu"):
        samples, srv, oth = [], [], []
        writes = syncs = 0
        for rep in range(1, REPEAT + 1):
            j = job(row, side, rep)
            if j.get("error"):
                raise SystemExit(f"fio reported error {j['error']} for {row} on {side}")
            samples.append(j[d]["bw"] / 1024.0 if metric == "bw" else j[d]["iops"])
            c = cpu(row, side, rep)
            srv.append(c["server_cpu"] / c["wall"])
            oth.append(c["other_cpu"] / c["wall"])
            writes += j["write"]["total_ios"]
            syncs += j.get("sync", {}).get("total_ios", 0)
        vals[side] = (statistics.median(samples), samples, statistics.median(srv), max(oth))
        if row == "randwrite":
            flush_note.append(f"{side}: {writes} writes, {syncs} flushes"
                              + (f" ({writes / syncs:.1f} writes per flush)" if syncs else ""))
    m, q = vals["mars"][0], vals["qemu"][0]
    fmt = (lambda x: f"{x:,.1f}") if metric == "bw" else (lambda x: f"{x:,.0f}")
    ok = q > 0 and m / q >= target
    verdicts.append(ok)
    rows.append(f"| {label} | {fmt(m)} | {fmt(q)} | {ratio(m, q)} | {'>= ' + format(target, '.1f') + 'x'} | {'met' if ok else 'MISSED'} |")
    if REPEAT > 1:
        rows[-1] += " " + ", ".join(fmt(x) for x in vals["mars"][1]) + " / " + ", ".join(fmt(x) for x in vals["qemu"][1]) + " |"
    cpu_rows.append(f"| {label.split(' (')[0]} | {vals['mars'][2]:.2f} | {vals['qemu'][2]:.2f} | {vals['mars'][3]:.2f} | {vals['qemu'][3]:.2f} |")

mh, qh = int(e["MARS_HWM"]), int(e["QEMU_HWM"])
rows.append(f"| peak RSS, VmHWM (MiB) | {mh / 1024:,.1f} | {qh / 1024:,.1f} | {ratio(mh, qh)} | (lower is better) | |")

size_gib = int(e["SIZE_BYTES"]) / 2**30
out = []
out.append("# mars vs qemu-nbd (NBD, 127.0.0.1)")
out.append("")
out.append("Target: mars >= qemu-nbd on every row, and >= 1.5x on the random-write row. "
           f"Result: {'all targets met' if all(verdicts) else 'target MISSED on ' + str(verdicts.count(False)) + ' row(s)'}.")
out.append("")
if REPEAT > 1:
    out.append(f"Median of {REPEAT} runs per row (each run listed after the verdict: mars / qemu-nbd).")
    out.append("")
    out.append("| row | mars | qemu-nbd | ratio (mars/qemu) | target | | runs |")
    out.append("|---|---:|---:|---:|---:|---|---|")
else:
    out.append("| row | mars | qemu-nbd | ratio (mars/qemu) | target | |")
    out.append("|---|---:|---:|---:|---:|---|")
out += rows
out.append("")
out.append(f"CPU during each row, in CPUs busy (of {e['NCPU']}): the server's own, and the most that everything"
           " other than fio and the server took (unrelated work on the machine, but also kernel threads working"
           " for the server, e.g. page-cache flushers; a high value with few CPUs makes the row unreliable).")
out.append("")
out.append("| row | marsd CPU | qemu-nbd CPU | other CPU during mars | other CPU during qemu |")
out.append("|---|---:|---:|---:|---:|")
out += cpu_rows
out.append("")
out.append(f"- date: {e['DATE']}; mars commit {e['GIT_REV']}")
out.append(f"- kernel: {e['KERNEL']}; CPU: {e['CPU_MODEL']}; memory: {e['MEM_TOTAL']}; load average at start {e['LOAD_START']}, at end {e['LOAD_END']}")
out.append(f"- {e['FIO_VER']}; {e['QEMU_VER']}")
out.append(f"- device: {size_gib:g} GiB file per server, `fallocate -l`, on {e['FSTYPE']}; {e['RUNTIME']} s per row, numjobs=1")
out.append(f"- command: `{e['CMDLINE'].strip()}`")
out.append(f"- reference: `{e['QEMU_CMD']}`" + ("" if e["QEMU_AIO"] == "native" else f" (NOTE: --aio=native refused, used --aio={e['QEMU_AIO']})"))
out.append("- ours: `marsd --dir NODE` serving resource r0 on its own disk file (default node settings)")
out.append(f"- fio: `fio --name=ROW {e['FIO_COMMON']} ROWARGS --uri=nbd://127.0.0.1:PORT/r0` with ROWARGS")
out.append(f"  `{e['ARGS_SEQ']}` / `{e['ARGS_RW']}` / `{e['ARGS_RR']}`;"
           " the read row follows a sequential 1 MiB prefill of the whole device on both servers")
if flush_note:  # only when the random-write row was measured (BENCH_ROWS)
    out.append(f"- flushes in the random-write row (fio JSON sync.total_ios): {'; '.join(flush_note)}."
               " fio sets last_was_sync only when a sync completes, so at QD32 it issues NBD_CMD_FLUSH into"
               " every free slot until the first one returns: the mix is far more flush-heavy than 1 per 32")
out.append("- not equal footing: qemu-nbd uses O_DIRECT (cache=none); marsd writes its log and its disk"
           " through the page cache (fdatasync on flush), so its reads may be served from RAM")
out.append(f"- between rows mars is let write back and delete applied logfiles (untimed); mars node dir at end (after the last settle): {int(e['MARS_LOG_BYTES']) / 2**20:,.0f} MiB")
print("\n".join(out))
EOF
)"
mkdir -p "$(dirname "$BENCH_OUT")"
printf '%s\n' "$REPORT" >"$BENCH_OUT"
printf '%s\n' "$REPORT"
say "written to $BENCH_OUT"
