#!/usr/bin/env bash
# Runs every Trireme test on a fresh machine: installs the system packages the
# integration tests and benchmarks drive (fio, libnbd-bin, qemu-utils,
# python3-libnbd, nbdkit, python3, and prometheus for promtool) when they are
# missing, then checks formatting and lints, builds the binaries the tests
# start, runs the unit and integration tests, and runs the benchmarks in quick
# mode.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v fio >/dev/null || missing+=(fio)
command -v nbdinfo >/dev/null && command -v nbdcopy >/dev/null || missing+=(libnbd-bin)
command -v qemu-io >/dev/null && command -v qemu-img >/dev/null && command -v qemu-nbd >/dev/null || missing+=(qemu-utils)
command -v nbdkit >/dev/null || missing+=(nbdkit)
command -v python3 >/dev/null || missing+=(python3)
# promtool checks the shipped alert rules (tests/tests/monitoring.rs).
command -v promtool >/dev/null || missing+=(prometheus)
/usr/bin/python3 -c 'import nbd' 2>/dev/null || missing+=(python3-libnbd)
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (the binaries the integration tests start)"
cargo build --workspace --bins --locked
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    cargo test --workspace --locked --no-fail-fast
fi
echo "== benchmarks (quick mode: checks they run; numbers are not asserted)"
python3 benches/fio_compare.py --quick
python3 benches/idle_scale.py --quick
