#!/usr/bin/env bash
# The chaos runner (crates/testenv-chaos): builds the debug binaries of tebroker, the testenv
# agents and the runner, then runs real brokers, workers and clients under random faults and
# checks the leases. Arguments go to testenv-chaos, e.g.
#   scripts/chaos.sh                              # 2 minutes, every fault, a random seed
#   scripts/chaos.sh --duration 10m --seed 42     # 10 minutes, replaying seed 42
# Exit status: 0 no violation, 1 violations (listed), 2 the run itself failed.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet -p tebroker -p testenv -p testenv-chaos --bins
bin="${CARGO_TARGET_DIR:-target}/debug"
exec "$bin/testenv-chaos" --bin "$bin" "$@"
