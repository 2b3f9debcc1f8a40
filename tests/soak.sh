#!/usr/bin/env bash
# Soak: runs the nemesis suite (tests/src/nemesis.rs) against a fresh local
# 3-node cluster of release binaries for DURATION (default 20m), injecting a
# fault every few seconds (all kinds in turn, targets chosen by the seed),
# then prints operations, faults, lost writes, stale reads and the longest
# unavailability. Exits non-zero on any lost write, stale or impossible read
# or non-linearizable block. Needs root (the disk-full fault mounts a tmpfs).
#
#   bash tests/soak.sh [DURATION] [nemesis options...]
#   bash tests/soak.sh 20m --json soak.json
#   bash tests/soak.sh 2h --faults kill,isolate,bridge --seed 42
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-20m}
[ $# -gt 0 ] && shift
echo "== building release binaries with failpoints"
cargo build --release --locked -p triremed -p trireme-cli --features triremed/failpoints
cargo build --release --locked -p trireme-tests --bin nemesis
export TRIREME_BIN_DIR="$PWD/target/release"
exec target/release/nemesis --duration "$duration" "$@"
