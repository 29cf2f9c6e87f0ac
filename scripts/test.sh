#!/usr/bin/env bash
# Every test: installs the real peers the interoperability tests run against (Debian
# gearman-job-server and gearman-tools, PyPI gear; skipped when present), then runs the
# workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-peers.sh
cargo test --workspace "$@"
