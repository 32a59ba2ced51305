#!/usr/bin/env bash
# Build the guest binaries (init, agent, test-only guest programs) static and
# reproducible: crt-static glibc, the `guest` profile, paths remapped so the
# bytes do not depend on where the repository or cargo's home is.
#
#   scripts/build-guest.sh [TARGET_DIR]
# Binaries land in TARGET_DIR/x86_64-unknown-linux-gnu/guest/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cargo_home=${CARGO_HOME:-$HOME/.cargo}
export CARGO_TARGET_DIR=${1:-${CARGO_TARGET_DIR:-$root/target}}
export RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$root=/parma --remap-path-prefix=$cargo_home=/cargo"
cd "$root"
cargo build --quiet --locked --profile guest --target x86_64-unknown-linux-gnu \
  -p parma-init -p parma-agent -p parma-test-guest
