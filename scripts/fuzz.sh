#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60); not part of CI.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Targets: decode (packet framing), admin (admin parser, ACL commands and file), broker (the
# core state machine fed with packet sequences, invariants checked after every step), testenv (the
# agents' lock-request and TE-data parsing, testenv-proto).
# Needs cargo-fuzz (`cargo install cargo-fuzz`). On a stable toolchain RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz use the nightly-only sanitizer flags. Crashes land in fuzz/artifacts/TARGET/; the
# corpus grows in fuzz/corpus/TARGET/ (both git-ignored). Extra libFuzzer flags may be given in
# FUZZ_ARGS, e.g. FUZZ_ARGS="-len_control=0 -max_len=2048" for long packet sequences at once.
set -euo pipefail
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode admin broker testenv)
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz" >&2; exit 1; }
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    [ -d "seeds/$t" ] && cp -n "seeds/$t"/* "corpus/$t/" 2>/dev/null || true
    echo "== fuzzing $t for ${secs}s"
    if ! cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 ${FUZZ_ARGS:-}; then
        echo "== $t: found a failure (see fuzz/artifacts/$t/)" >&2
        status=1
    fi
done
exit $status
