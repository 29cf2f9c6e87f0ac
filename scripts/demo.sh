#!/usr/bin/env bash
# The demo: tebroker with a pool of three test environments (demo/testenv-*.json), and a few CI
# jobs (testenv-client) that each lock one, print which TE they got, and hand it back.
# Usage: scripts/demo.sh [JOBS]   (default 5 jobs for 3 TEs, so some wait their turn)
# DEMO_BIN=DIR uses the binaries in DIR (e.g. target/debug) instead of a release build.
# Run from a terminal, it waits for Enter at the end so the dashboard can be looked at.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${1:-5}"

if [ -z "${DEMO_BIN:-}" ]; then
    echo "== building (release)"
    cargo build --release -q -p tebroker -p testenv -p testenv-agent
fi
bin=${DEMO_BIN:-target/release}
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "== starting tebroker on a free port"
"$bin/tebroker" serve -p 0 -L 127.0.0.1 --http 127.0.0.1:0 --data-dir "$work/data" \
    --history-file "$work/history.jsonl" \
    >"$work/broker.out" 2>"$work/broker.err" &
pids+=($!)
for _ in $(seq 50); do grep -q listening "$work/broker.out" 2>/dev/null && break; sleep 0.1; done
addr="$(sed -n 's/^tebroker listening on //p' "$work/broker.out")"
[ -n "$addr" ] || { echo "tebroker did not start:"; cat "$work/broker.err"; exit 1; }
echo "   tebroker listening on $addr"
for _ in $(seq 50); do grep -q dashboard "$work/broker.out" && break; sleep 0.1; done
echo "   $(grep dashboard "$work/broker.out") (JSON under /api/, Prometheus at /metrics)"
url="$(sed -n 's|^tebroker dashboard on \(http://[^/]*\)/$|\1|p' "$work/broker.out")"

echo "== starting one testenv-worker per demo TE"
for f in demo/testenv-*.json; do
    n="$(basename "$f" .json)"
    "$bin/testenv-worker" -b "$addr" -n "$n" --state-dir "$work/state" "$f" 2>"$work/$n.log" &
    pids+=($!)
done
sleep 0.5

admin() { exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}"; printf '%s\n' "$1" >&3; timeout 1 sed '/^\.$/q' <&3; exec 3>&-; }

echo "== broker status (function, jobs, running, workers)"
admin status

echo "== running $jobs CI jobs at once; each holds its TE for 2 seconds"
job_pids=()
for i in $(seq "$jobs"); do
    TOCI_JOBTYPE="demo-job-$i" "$bin/testenv-client" -b "$addr" -n "demo$i" -- sh -c '
        env_num=$(sed -n "s/.*\"env-num\": \"\([0-9]*\)\".*/\1/p" "$TE_DATAFILE")
        seed=$(sed -n "s/.*\"seed-ip\": \"\([0-9.]*\)\".*/\1/p" "$TE_DATAFILE")
        echo "   job '"$i"': locked TE env-num=$env_num (seed $seed), datafile $TE_DATAFILE"
        sleep 2
        echo "   job '"$i"': done, releasing TE env-num=$env_num"' 2>>"$work/clients.log" &
    job_pids+=($!)
done
sleep 1
echo "== leases seen by the broker (handle, worker, holder, job, held s, timeout, state)"
admin leases
status=0
for p in "${job_pids[@]}"; do wait "$p" || status=$?; done
echo "== all jobs finished (last non-zero exit: $status); broker status now"
admin status
echo "== lease history (--history-file, one JSON line per ended lease)"
for _ in $(seq 20); do [ "$(wc -l <"$work/history.jsonl" 2>/dev/null || echo 0)" -ge "$jobs" ] && break; sleep 0.1; done
sed 's/^/   /' "$work/history.jsonl"
echo "== worker log of one TE"
sed 's/^/   /' "$work/testenv-1.log"

echo "== testenv-agent: one agent serving a pool of two TEs; agent-te2 fails its first health check"
cat >"$work/health.sh" <<HOOK
#!/bin/sh
# agent-te2 "lost its IP" until it has been rebuilt once; nobody acts.
if [ "\$TE_NAME" = agent-te2 ] && [ ! -e "$work/rebuilt" ]; then echo "no route to \$TE_NAME"; exit 1; fi
sleep 1
HOOK
chmod +x "$work/health.sh"
cat >"$work/agent.toml" <<CONF
brokers = ["$addr"]
agent = "demo-host"
state_dir = "$work/agent-state"
control_socket = "$work/agent.sock"
[hooks]
health = "$work/health.sh"
rebuild = "sleep 1; touch $work/rebuilt"
timeout = "30s"
[[te]]
name = "agent-te1"
datafile = "demo/testenv-1.json"
labels = ["ovb"]
[[te]]
name = "agent-te2"
datafile = "demo/testenv-2.json"
CONF
"$bin/testenv-agent" --config "$work/agent.toml" 2>"$work/agent.log" &
pids+=($!)
for _ in $(seq 50); do [ -S "$work/agent.sock" ] && break; sleep 0.1; done
sleep 0.5
echo "   testenv-agent ctl status, just after start:"
"$bin/testenv-agent" ctl --socket "$work/agent.sock" status | sed 's/^/   /'
for _ in $(seq 100); do
    "$bin/testenv-agent" ctl --socket "$work/agent.sock" status --json | grep -q '"state": "\(unhealthy\|rebuilding\|provisioning\)"' || break
    sleep 0.1
done
echo "   testenv-agent ctl status, a few seconds later (agent-te2 was rebuilt and checked again):"
"$bin/testenv-agent" ctl --socket "$work/agent.sock" status | sed 's/^/   /'
echo "   a job asking for label ovb:"
"$bin/testenv-client" -b "$addr" --label ovb -- sh -c 'echo "   got $(grep -o "\"env-num\": \"[0-9]*\"" "$TE_DATAFILE")"' 2>>"$work/clients.log"
echo "== tebroker envs (the inventory the dashboard shows: the workers' TEs and the agent's)"
for _ in $(seq 50); do "$bin/tebroker" envs --url "$url" | grep -q agent-te2 && break; sleep 0.1; done
"$bin/tebroker" envs --url "$url" | sed 's/^/   /'
echo "== tebroker history --limit 3 (the ended leases, from the broker's store)"
"$bin/tebroker" history --url "$url" --limit 3 | sed 's/^/   /'
if [ -t 0 ]; then
    echo "== the dashboard is at $url/ ; press Enter to stop the demo"
    read -r _
fi
