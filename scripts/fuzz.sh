#!/usr/bin/env bash
# Run every cargo-fuzz target in fuzz/ for a short while.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 20); TARGETs default to all of `cargo fuzz list`.
# Installs cargo-fuzz if it is missing. Works on a stable toolchain
# (RUSTC_BOOTSTRAP=1 unlocks the -Z sanitizer flags cargo-fuzz needs).
# Corpora grow in fuzz/corpus/<target>/ (gitignored), seeded from the committed
# fuzz/seeds/<target>/. Exits 1 if any target crashed (or hung / ran out of
# memory) and prints where the crashing input was written and how to replay it.
# Extra libFuzzer flags can be passed in FUZZ_FLAGS, e.g. FUZZ_FLAGS="-jobs=2".
set -euo pipefail

secs="${1:-20}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
fi
shift || true

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz="$root/fuzz"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo >/dev/null 2>&1; then
    echo "fuzz.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi
if ! command -v c++ >/dev/null 2>&1 && ! command -v clang++ >/dev/null 2>&1 \
    && ! command -v g++ >/dev/null 2>&1; then
    echo "fuzz.sh: warning: no C++ compiler found; libfuzzer-sys needs one (e.g. apt-get install g++)" >&2
fi

cd "$fuzz"
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "fuzz.sh: building ${targets[*]}"
cargo fuzz build

logdir="$fuzz/target/fuzz-logs"
mkdir -p "$logdir"
failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    # Inputs that once crashed are read first on every run: a fixed bug stays fixed.
    [ -d "regressions/$t" ] && seeds+=("regressions/$t")
    log="$logdir/$t.log"
    echo
    echo "=== $t: ${secs}s (log: $log)"
    set +e
    # shellcheck disable=SC2086 # FUZZ_FLAGS is a list of flags
    cargo fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
        ${FUZZ_FLAGS:-} >"$log" 2>&1
    rc=$?
    set -e
    last="$(grep -E '^#[0-9]+' "$log" | tail -1 || true)"
    execs="$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -1 || true)"
    speed="$(grep -E '^stat::average_exec_per_sec' "$log" | awk '{print $2}' | tail -1 || true)"
    if [ "$rc" -eq 0 ]; then
        echo "$t: ok, ${execs:-?} runs, ${speed:-?} exec/s"
        echo "  $last"
        summary+=("$t: ok (${execs:-?} runs, ${speed:-?} exec/s)")
    else
        failed+=("$t")
        echo "$t: FAILED (exit $rc)"
        grep -E -A1 "panicked at" "$log" | head -4 || true
        grep -E "ERROR: libFuzzer|^SUMMARY" "$log" | head -2 || true
        units="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log")"
        if [ -n "$units" ]; then
            while read -r u; do
                u="$(cd "$fuzz" && realpath -m "$u")"
                echo "  crashing input: $u"
                echo "  replay: (cd $fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $t $u)"
                echo "  minimize: (cd $fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz tmin $t $u)"
            done <<<"$units"
        else
            echo "  no crashing input written; see $log"
        fi
        summary+=("$t: FAILED, see $log")
    fi
done

echo
echo "=== summary (${secs}s per target)"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
