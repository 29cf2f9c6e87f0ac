#!/usr/bin/env bash
# Installs the Debian packages of scripts/package.sh on this machine and uses them from their
# installed paths: --version of every binary, check-config on the installed configs (the
# broker's and the agent's sample), the man pages and completions, systemd-analyze verify on
# the units (where it exists), then the installed broker (as the tebroker user, with the
# installed config) leases a TE from the installed testenv-worker, and one from the installed
# testenv-agent, to the installed testenv-client. Then remove, purge, and check that
# nothing the packages installed is left (the system user "tebroker" stays, as Debian policy
# wants: files elsewhere may still belong to its uid).
# Needs root and a machine where installing the packages does no harm (CI's throwaway clone);
# refuses to run when either package is already installed. The packages are purged on every exit.
# Usage: scripts/test-packages.sh [DIR_WITH_DEBS]   (default: build them with scripts/package.sh)
# Measured: about 15-20 s after the release build (of which the man-db trigger is ~10 s).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(tebroker testenv-agents)

fail() { echo "test-packages: FAIL: $*" >&2; exit 1; }
step() { printf -- '--- %s (%ss)\n' "$*" "$SECONDS"; }

[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i)"
for p in "${PACKAGES[@]}"; do
    if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'installed'; then
        fail "$p is already installed here; this test installs and purges it"
    fi
done

scratch=$(mktemp -d)
broker_pid=
worker_pid=
agent_pid=
cleanup() {
    local rc=$?
    for pid in $agent_pid $worker_pid $broker_pid; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    dpkg --purge "${PACKAGES[@]}" >/dev/null 2>&1 || true
    rm -rf "$scratch"
    exit "$rc"
}
trap cleanup EXIT

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND until it succeeds or the time is up.
wait_for() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || fail "no $what within the deadline"
        sleep 0.1
    done
}

if [ $# -ge 1 ]; then
    debs=("$1"/*.deb)
else
    step "scripts/package.sh"
    mapfile -t debs < <(scripts/package.sh)
fi
[ "${#debs[@]}" = "${#PACKAGES[@]}" ] || fail "expected ${#PACKAGES[@]} packages, got: ${debs[*]}"

# Every path the packages ship that this machine does not already have must be gone after purge.
for deb in "${debs[@]}"; do dpkg-deb --fsys-tarfile "$deb" | tar -t; done | sed 's|^\./|/|; s|/$||' |
    sort -u | while read -r path; do
    if [ -n "$path" ] && [ ! -e "$path" ]; then echo "$path"; fi
done >"$scratch/new-paths"
[ -s "$scratch/new-paths" ] || fail "the packages ship nothing this machine lacks?"

step "dpkg -i ${debs[*]##*/}"
dpkg -i "${debs[@]}"
# A second install of the same version runs the upgrade paths of the maintainer scripts.
dpkg -i "${debs[@]}" >/dev/null

step "the binaries from /usr/bin"
# Every binary the packages ship (a new one is checked without touching this script).
mapfile -t BINARIES < <(dpkg-query -L "${PACKAGES[@]}" | sed -n 's|^/usr/bin/\(..*\)$|\1|p')
[ "${#BINARIES[@]}" -ge 3 ] || fail "binaries in the packages: ${BINARIES[*]}"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
for b in "${BINARIES[@]}"; do
    [ "$(command -v "$b")" = "/usr/bin/$b" ] || [ -x "/usr/bin/$b" ] || fail "/usr/bin/$b missing"
    out=$("/usr/bin/$b" --version)
    [ "$out" = "$b $version" ] || fail "/usr/bin/$b --version said '$out'"
    man -P cat -l "/usr/share/man/man1/$b.1.gz" 2>/dev/null | grep -q -- "--version" ||
        fail "man page of $b does not render"
    for f in "/usr/share/bash-completion/completions/$b" "/usr/share/zsh/vendor-completions/_$b" \
        "/usr/share/fish/vendor_completions.d/$b.fish"; do
        [ -s "$f" ] || fail "completion $f missing"
    done
done
man -P cat -l /usr/share/man/man1/tebroker-serve.1.gz 2>/dev/null | grep -q -- "--shutdown-timeout" ||
    fail "tebroker-serve(1) does not document --shutdown-timeout"
bash -c 'source /usr/share/bash-completion/completions/tebroker && complete -p tebroker' >/dev/null ||
    fail "the bash completion of tebroker does not load"

step "tebroker check-config /etc/tebroker/tebroker.toml"
/usr/bin/tebroker check-config /etc/tebroker/tebroker.toml >"$scratch/effective"
grep -qx 'port = 4730' "$scratch/effective" || fail "check-config: $(cat "$scratch/effective")"
grep -qx '/etc/tebroker/tebroker.toml' /var/lib/dpkg/info/tebroker.conffiles || fail "no conffile"
[ "$(stat -c %U /var/lib/tebroker)" = tebroker ] || fail "/var/lib/tebroker not owned by tebroker"
getent passwd tebroker | grep -q ':/usr/sbin/nologin$' || fail "no system user tebroker"
wants=/etc/systemd/system/multi-user.target.wants/tebroker.service
if command -v systemctl >/dev/null; then
    [ -L "$wants" ] || fail "tebroker.service not enabled on install"
fi

step "testenv-agent check-config /etc/testenv-agent/testenv-agent.toml"
/usr/bin/testenv-agent check-config /etc/testenv-agent/testenv-agent.toml >"$scratch/agent-effective" ||
    fail "testenv-agent check-config on the installed sample: $(cat "$scratch/agent-effective")"
grep -q '^\[te te1\]' "$scratch/agent-effective" || fail "agent check-config: $(cat "$scratch/agent-effective")"
grep -qx '/etc/testenv-agent/testenv-agent.toml' /var/lib/dpkg/info/testenv-agents.conffiles ||
    fail "the agent's config is no conffile"
man -P cat -l /usr/share/man/man1/testenv-agent-ctl-hold.1.gz 2>/dev/null | grep -q -- "--for" ||
    fail "testenv-agent-ctl-hold(1) does not document --for"
if [ -L /etc/systemd/system/multi-user.target.wants/testenv-agent.service ]; then
    fail "testenv-agent.service enabled on install (its config lists no real TE yet)"
fi

if command -v systemd-analyze >/dev/null; then
    step "systemd-analyze verify"
    # A template is verified through an instance of it.
    cp /lib/systemd/system/testenv-worker@.service "$scratch/testenv-worker@te1.service"
    systemd-analyze verify /lib/systemd/system/tebroker.service \
        "$scratch/testenv-worker@te1.service" /lib/systemd/system/testenv-agent.service
else
    echo "test-packages: systemd-analyze not found; units not verified"
fi

step "the installed broker leases a TE from the installed worker to the installed client"
# As the service runs it: the tebroker user, the installed config (its lease history goes to
# /var/lib/tebroker), only the ports moved to free ones.
setpriv --reuid=tebroker --regid=tebroker --init-groups /usr/bin/tebroker serve --config /etc/tebroker/tebroker.toml \
    -L 127.0.0.1 -p 0 --http 127.0.0.1:0 >"$scratch/broker.out" 2>"$scratch/broker.err" &
broker_pid=$!
listening() { grep -q '^tebroker listening on ' "$scratch/broker.out" 2>/dev/null; }
wait_for 30 "listening line from tebroker serve" listening
addr=$(sed -n 's/^tebroker listening on //p' "$scratch/broker.out")
# Two nodes: the agent serves a request only with the nodes it needs (envsize, default 2).
cat >"$scratch/te1.json" <<'JSON'
{"env-num": "1", "host-ip": "192.0.2.1", "seed-ip": "192.0.2.11", "ssh-user": "root",
 "nodes": [{"mac": ["52:54:00:00:01:01"], "cpu": "1", "memory": "3072", "disk": "40",
            "arch": "i386", "pm_type": "pxe_ssh", "pm_addr": "192.0.2.1", "pm_user": "root"},
           {"mac": ["52:54:00:00:01:02"], "cpu": "1", "memory": "3072", "disk": "40",
            "arch": "i386", "pm_type": "pxe_ssh", "pm_addr": "192.0.2.1", "pm_user": "root"}]}
JSON
/usr/bin/testenv-worker -b "$addr" -n te1 --state-dir "$scratch/state" --once \
    "$scratch/te1.json" >"$scratch/worker.log" 2>&1 &
worker_pid=$!
registered() {
    /usr/bin/tebroker admin -b "$addr" status | awk -F'\t' '$1 == "lockenv" && $4 > 0 { ok = 1 } END { exit !ok }'
}
wait_for 30 "lockenv worker on the broker" registered
timeout 60 /usr/bin/testenv-client -b "$addr" -t 60 -- \
    sh -c 'cp "$TE_DATAFILE" "$0"' "$scratch/leased.json" ||
    fail "testenv-client exited $?: $(cat "$scratch/worker.log")"
grep -q '"host-ip": "192.0.2.1"' "$scratch/leased.json" || fail "leased: $(cat "$scratch/leased.json")"
recorded() { [ -s /var/lib/tebroker/leases.jsonl ]; }
wait_for 30 "lease in /var/lib/tebroker/leases.jsonl" recorded
wait "$worker_pid" || fail "testenv-worker --once exited $?: $(cat "$scratch/worker.log")"
worker_pid=

cat >"$scratch/agent.toml" <<TOML
brokers = ["$addr"]
agent = "pkgtest"
state_dir = "$scratch/agent-state"
control_socket = "$scratch/agent.sock"
[[te]]
name = "te1"
datafile = "$scratch/te1.json"
TOML
/usr/bin/testenv-agent --config "$scratch/agent.toml" >"$scratch/agent.log" 2>&1 &
agent_pid=$!
agent_ready() {
    /usr/bin/tebroker admin -b "$addr" envs | awk -F'\t' '$1 == "te1" && $2 == "ready" && $5 == "pkgtest" { ok = 1 } END { exit !ok }'
}
wait_for 30 "te1 ready from the installed testenv-agent" agent_ready
rm -f "$scratch/leased.json"
timeout 60 /usr/bin/testenv-client -b "$addr" -t 60 -- \
    sh -c 'cp "$TE_DATAFILE" "$0"' "$scratch/leased.json" ||
    fail "testenv-client through the agent exited $?: $(cat "$scratch/agent.log")"
grep -q '"host-ip": "192.0.2.1"' "$scratch/leased.json" || fail "leased: $(cat "$scratch/leased.json")"
/usr/bin/testenv-agent ctl --socket "$scratch/agent.sock" status | grep -q '^te1 ' ||
    fail "testenv-agent ctl status: $(/usr/bin/testenv-agent ctl --socket "$scratch/agent.sock" status 2>&1)"
kill -TERM "$agent_pid"
wait "$agent_pid" || fail "testenv-agent exited $? on SIGTERM: $(cat "$scratch/agent.log")"
agent_pid=
kill -TERM "$broker_pid"
wait "$broker_pid" || fail "tebroker serve exited $? on SIGTERM: $(cat "$scratch/broker.err")"
broker_pid=

step "dpkg -r, then dpkg --purge"
dpkg -r "${PACKAGES[@]}" >/dev/null
[ -e /etc/tebroker/tebroker.toml ] || fail "dpkg -r removed the conffile (only purge may)"
if [ -L "$wants" ]; then fail "dpkg -r left tebroker.service enabled"; fi
if [ -e /usr/bin/tebroker ]; then fail "dpkg -r left /usr/bin/tebroker"; fi
dpkg --purge "${PACKAGES[@]}" >/dev/null
left=()
while read -r path; do
    if [ -e "$path" ]; then left+=("$path"); fi
done <"$scratch/new-paths"
for path in /etc/tebroker /var/lib/tebroker /var/lib/testenv-worker /etc/testenv \
    /etc/testenv-agent /var/lib/testenv-agent; do
    if [ -e "$path" ]; then left+=("$path"); fi
done
[ "${#left[@]}" = 0 ] || fail "left after purge: ${left[*]}"
if getent passwd tebroker >/dev/null; then
    echo "test-packages: the system user tebroker stays (Debian policy)"
fi
echo "test-packages: OK (${SECONDS}s)"
