#!/usr/bin/env bash
# Every test: installs the real peers the interoperability tests run against (Debian
# gearman-job-server and gearman-tools, PyPI gear; skipped when present), then runs the
# workspace's tests, then the chaos runner for about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-peers.sh
cargo test --workspace "$@"

# The chaos runner: 2 minutes of kills and stops of clients, workers and brokers on real
# processes; it prints its summary and fails on any violation. CHAOS_ARGS adds flags (a
# --seed to replay a failure, --faults to narrow it down).
echo "== chaos runner: 2 minutes (scripts/chaos.sh --duration 120s ${CHAOS_ARGS:-}) =="
# The 70 s network cut is left to the longer runs (README): a TE cut off near the end of a
# 2-minute run is still in its resume grace (120 s) when the drain ends.
# shellcheck disable=SC2086 # CHAOS_ARGS is a list of flags
scripts/chaos.sh --duration 120s \
    --faults kill-client,kill-worker,kill-broker,stop-client,stop-worker,stop-broker ${CHAOS_ARGS:-}
