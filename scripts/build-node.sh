#!/usr/bin/env bash
# Build the node image's programs (parma, the containerd shim, the
# snapshotter) static, stripped and reproducible: crt-static glibc, the release
# profile, paths remapped so the bytes do not depend on where the
# repository or cargo's home is. The node image runs them on any node, and
# from a container with nothing else in it (the DaemonSet's installer).
#
#   scripts/build-node.sh [TARGET_DIR]
# Binaries land in TARGET_DIR/x86_64-unknown-linux-gnu/release/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cargo_home=${CARGO_HOME:-$HOME/.cargo}
export CARGO_TARGET_DIR=${1:-${CARGO_TARGET_DIR:-$root/target}}
export RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols --remap-path-prefix=$root=/parma --remap-path-prefix=$cargo_home=/cargo"
cd "$root"
cargo build --quiet --locked --release --target x86_64-unknown-linux-gnu \
  -p parma -p parma-shim -p parma-snapshotter
