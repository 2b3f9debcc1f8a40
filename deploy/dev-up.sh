#!/usr/bin/env bash
# Builds Trireme and starts a local dev cluster serving volume vol0.
#   bash deploy/dev-up.sh [--nodes N] [--data-dir DIR] [--base-port P] [--volume-size SIZE]
# Prints one JSON line describing the nodes (stdout) and how to attach (stderr);
# Ctrl-C stops the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --locked >&2
args=("$@")
has() { for a in "${args[@]}"; do [ "$a" = "$1" ] && return 0; done; return 1; }
has --nodes || args+=(--nodes 1)
has --data-dir || args+=(--data-dir "${TMPDIR:-/tmp}/trireme-dev")
exec target/release/trireme dev up "${args[@]}"
