#!/usr/bin/env bash
# Every test: installs the real peers the interoperability tests run against (Debian
# gearman-job-server and gearman-tools, PyPI gear; skipped when present), then runs the
# workspace's tests, then the chaos runner for about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-peers.sh
cargo test --workspace "$@"

# The chaos runner: 2 minutes of every fault (broker kills and a network cut included) on real
# processes; it prints its summary and fails on any violation. CHAOS_ARGS adds flags (a
# --seed to replay a failure, --faults to narrow it down).
echo "== chaos runner: 2 minutes (scripts/chaos.sh --duration 120s ${CHAOS_ARGS:-}) =="
# shellcheck disable=SC2086 # CHAOS_ARGS is a list of flags
scripts/chaos.sh --duration 120s ${CHAOS_ARGS:-}
