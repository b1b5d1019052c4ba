#!/usr/bin/env bash
# Write the man pages from the clap definitions: man/marsadm.1 (`marsadm man`)
# and man/marsd.8 (`marsd --man`). Run it after changing a command, an option or
# a help text, and commit the result: crates/mars/tests/cli.rs fails while the
# committed pages differ from what the binaries generate.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p mars --bin marsadm --bin marsd
target=${CARGO_TARGET_DIR:-target}
mkdir -p man
"$target/debug/marsadm" man >man/marsadm.1.new
mv man/marsadm.1.new man/marsadm.1
"$target/debug/marsd" --man >man/marsd.8.new
mv man/marsd.8.new man/marsd.8
echo "wrote man/marsadm.1 and man/marsd.8"
