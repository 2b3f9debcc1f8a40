#!/usr/bin/env bash
# Runs the deterministic simulation of a volume's Raft group
# (crates/replica/tests/sim.rs) over many seeds, in release mode, on every
# core: the regression seeds of crates/replica/tests/sim_regressions.txt,
# then SEEDS seeds from FIRST.
#
#   bash tests/sim.sh [SEEDS] [FIRST]      e.g. bash tests/sim.sh 10000
#
# A failing seed is printed with the command that replays it
# (SIM_SEED=n cargo test -p trireme-replica --test sim).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-1000}
first=${2:-1}
unset SIM_SEED
SIM_SEEDS=$seeds SIM_FIRST_SEED=$first exec cargo test --release -p trireme-replica --test sim -- --nocapture
