#!/usr/bin/env bash
# Benchmark tebroker against gearmand and geard (not a test; prints a table).
#
#   scripts/bench.sh [--quick] [options] [workload...]
#
# Workloads (default: all): echo, echo-idle, lease, lease-readers, history-api (needs
# --history-dir), client-wall.
# Options are passed to tebroker-bench: --quick, --seconds N, --idle N, --runs N,
# --readers N, --servers tebroker,gearmand,geard. Missing peers are reported and skipped
# (scripts/install-peers.sh installs them). See `target/release/tebroker-bench --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p tebroker -p testenv -p tebroker-bench >&2
exec target/release/tebroker-bench "$@"
