#!/usr/bin/env bash
# The nemesis for as long as asked: seeds one after another (three real marsd in
# network namespaces, see crates/mars/tests/nemesis.rs), until SECONDS have passed.
# Needs root and iproute2. A failure stops the run and names its seed; replay it with
#   NEMESIS_SEED=<seed> NEMESIS_STEPS=<steps> cargo test -p mars --test nemesis -- --nocapture
#
#   scripts/nemesis.sh [SECONDS] [FIRST_SEED]     (default 3600 s from seed 1000)
#   NEMESIS_STEPS (default 100)
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-3600}
seed=${2:-1000}
steps=${NEMESIS_STEPS:-100}
cargo build -p mars --bins --tests --quiet
end=$((SECONDS + budget))
runs=0
while ((SECONDS < end)); do
    NEMESIS_SEED=$seed NEMESIS_STEPS=$steps cargo test -p mars --test nemesis --quiet -- --nocapture 2>&1 |
        grep -E "^nemesis seed .* steps|panicked|seed [0-9]+ failed" || true
    if [[ ${PIPESTATUS[0]} -ne 0 ]]; then
        echo "nemesis: seed $seed failed (after $runs seeds passed)" >&2
        exit 1
    fi
    runs=$((runs + 1))
    seed=$((seed + 1))
done
echo "nemesis: $runs seeds of $steps steps passed in ${budget} s (last seed $((seed - 1)))"
