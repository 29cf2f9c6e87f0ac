#!/usr/bin/env bash
# Benchmark testenv-agent (issue 9, "Speed and memory"; not a test; prints figures):
# RSS and idle CPU of one agent serving N static TEs (default 100) through tebroker, and the
# client's wall time per lease (`testenv-client -- true`, sequential) through the agent vs
# through one testenv-worker.
#
#   scripts/bench-agent.sh [TES] [LEASES]      PROFILE=debug to skip the release build
set -euo pipefail
cd "$(dirname "$0")/.."
TES=${1:-100}
LEASES=${2:-30}
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then
  cargo build --release -p tebroker -p testenv -p testenv-agent >&2
else
  cargo build -p tebroker -p testenv -p testenv-agent >&2
fi
BIN=target/$PROFILE
T=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$T"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P=$(port)
"$BIN/tebroker" serve -p "$P" -L 127.0.0.1 >"$T/broker.log" 2>&1 & PIDS+=($!)
echo '{"env-num":"1","nodes":[{},{}]}' >"$T/te.json"
{
  echo "brokers = [\"127.0.0.1:$P\"]"; echo "agent = \"bench\""
  echo "state_dir = \"$T/state\""; echo "control_socket = \"$T/ctl.sock\""
  echo "[hooks]"; echo "health = \"true\""
  for i in $(seq 1 "$TES"); do echo "[[te]]"; echo "name = \"te$i\""; echo "datafile = \"$T/te.json\""; done
} >"$T/agent.toml"
sleep 0.5
"$BIN/testenv-agent" --config "$T/agent.toml" >"$T/agent.log" 2>&1 & AGENT=$!; PIDS+=($AGENT)
for _ in $(seq 1 300); do
  n=$("$BIN/testenv-agent" ctl --socket "$T/ctl.sock" status --json 2>/dev/null | grep -c '"state": "ready"' || true)
  [ "$n" = "$TES" ] && break; sleep 0.1
done
echo "agent: $n of $TES TEs ready"
sleep 5
ticks() { awk '{print $14+$15}' "/proc/$AGENT/stat"; }
HZ=$(getconf CLK_TCK)
t0=$(ticks); sleep 30; t1=$(ticks)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$AGENT/status")
echo "agent idle: RSS $((rss / 1024)) MiB ($rss kB), CPU $(python3 -c "print(f'{($t1-$t0)/$HZ/30*100:.2f}')") % of a core over 30 s"
wall() {
  local start end
  start=$(date +%s%N)
  for _ in $(seq 1 "$LEASES"); do "$BIN/testenv-client" -b "127.0.0.1:$1" -t 60 -- true 2>/dev/null; done
  end=$(date +%s%N)
  python3 -c "print(f'{($end-$start)/1e6/$LEASES:.1f} ms')"
}
echo "client-wall through the agent ($TES TEs): $(wall "$P") per lease"
kill "$AGENT"; wait "$AGENT" 2>/dev/null || true
{
  echo "brokers = [\"127.0.0.1:$P\"]"; echo "agent = \"bench-od\""
  echo "state_dir = \"$T/odstate\""; echo "control_socket = \"$T/odctl.sock\""
  echo "[hooks]"; echo "create = \"cp $T/te.json \$TE_DATAFILE\""; echo "destroy = \"true\""
  echo "[on_demand]"; echo "max_envs = 4"; echo "min_ready = 2"; echo "max_concurrent_creates = 2"
} >"$T/od.toml"
"$BIN/testenv-agent" --config "$T/od.toml" >"$T/od.log" 2>&1 & AGENT=$!; PIDS+=($AGENT)
for _ in $(seq 1 300); do
  n=$("$BIN/testenv-agent" ctl --socket "$T/odctl.sock" status --json 2>/dev/null | grep -c '"state": "ready"' || true)
  [ "$n" = 2 ] && break; sleep 0.1
done
echo "client-wall through on-demand TEs (min_ready 2): $(wall "$P") per lease"
kill "$AGENT"; wait "$AGENT" 2>/dev/null || true
"$BIN/testenv-worker" -b "127.0.0.1:$P" -n bench-worker --state-dir "$T/wstate" "$T/te.json" >"$T/worker.log" 2>&1 & PIDS+=($!)
sleep 1
echo "client-wall through one testenv-worker:  $(wall "$P") per lease"
