#!/usr/bin/env bash
# Many seeds of the history and replication simulations (release build), in
# chunks, so that a long run reports as it goes:
#   scripts/history-sim.sh [SEEDS] [FIRST]       (default 100000 from 0)
# A failing seed is named; replay it with
#   MARS_SIM_SEED=<seed> MARS_SIM_TRACE=1 cargo test --release -p mars-replication --test history_sim
set -euo pipefail
cd "$(dirname "$0")/.."
total=${1:-100000}
first=${2:-0}
chunk=${CHUNK:-5000}
cargo build --release -p mars-replication --tests --quiet
done_=0
while ((done_ < total)); do
    n=$((total - done_ < chunk ? total - done_ : chunk))
    from=$((first + done_))
    MARS_SIM_FIRST=$from MARS_SIM_SEEDS=$n cargo test --release --quiet -p mars-replication \
        --test history_sim -- --nocapture 2>&1 | grep -E "simulation:|panicked|seed" || true
    if [[ ${PIPESTATUS[0]} -ne 0 ]]; then
        echo "history-sim: a seed in $from..$((from + n)) failed" >&2
        exit 1
    fi
    done_=$((done_ + n))
    echo "history-sim: seeds $first..$((first + done_)) passed"
done
