#!/usr/bin/env bash
# Installs the peer programs the interoperability tests and the benchmark run against:
#   - Debian gearman-job-server (gearmand) and gearman-tools (gearman, gearadmin), via apt-get;
#   - PyPI gear (Client/Worker library and geard), via pip;
#   - Debian postgresql (initdb, pg_ctl, postgres), via apt-get: the store's tests and benchmark
#     start throwaway clusters of their own (test-support's PgCluster), on free ports with
#     private sockets, so no system cluster is wanted (none is created, see below).
#   - Debian chromium (headless): the dashboard's browser test (tests/dashboard_browser.rs).
#   - PyPI prometheus-client (its text-format parser checks tebroker's /metrics), via pip.
# Idempotent: anything already installed is left alone. Runs as root, or through sudo.
# Environment: PYTHON (default python3) is the interpreter gear is installed for.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
APT_PACKAGES=(gearman-job-server gearman-tools postgresql chromium)

log() { printf 'install-peers: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root (or sudo) to run: $*"
        exit 1
    fi
}

deb_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
    deb_installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
    log "apt: ${APT_PACKAGES[*]} already installed"
else
    if ! command -v apt-get >/dev/null 2>&1; then
        log "apt-get not found; install ${missing[*]} (gearmand, gearman, gearadmin) by hand"
        exit 1
    fi
    log "apt: installing ${missing[*]}"
    if [[ " ${missing[*]} " == *" postgresql "* ]]; then
        # Debian's postgresql-common would create (and start, where services run) a "main"
        # cluster on port 5432 that nothing here uses; the tests make their own.
        as_root mkdir -p /etc/postgresql-common/createcluster.d
        echo 'create_main_cluster = false' |
            as_root tee /etc/postgresql-common/createcluster.d/50-tebroker-no-main-cluster.conf >/dev/null
    fi
    export DEBIAN_FRONTEND=noninteractive
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -qq update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >/dev/null
fi

# pip_package MODULE PACKAGE: installs PACKAGE unless MODULE is importable.
pip_package() {
    local module="$1" package="$2"
    if "$PYTHON" -c "import $module" >/dev/null 2>&1; then
        log "pip: $package already importable by $PYTHON"
        return
    fi
    log "pip: installing $package for $PYTHON"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
    pip_install() { "$PYTHON" -m pip install --quiet "$@" "$package"; }
    errf="$(mktemp)"
    if ! pip_install 2>"$errf"; then
        # Debian's own python refuses system-wide pip installs (PEP 668).
        if grep -q externally-managed "$errf"; then
            pip_install --break-system-packages
        else
            cat "$errf" >&2
            rm -f "$errf"
            exit 1
        fi
    fi
    rm -f "$errf"
    "$PYTHON" -c "import $module" || { log "$package still not importable by $PYTHON"; exit 1; }
    # Under pyenv, new console scripts (geard) need their shim.
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
}
pip_package gear gear
# The reference Prometheus text parser, for the test of tebroker's /metrics.
pip_package prometheus_client prometheus-client

# Everything the tests run must now be there.
for prog in gearmand gearman gearadmin geard; do
    if ! command -v "$prog" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$prog" ]; then
        log "$prog not found on PATH after installation"
        exit 1
    fi
done
pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ] || [ ! -x "$pg_bin/pg_ctl" ]; then
    log "PostgreSQL's initdb/pg_ctl not found under /usr/lib/postgresql/*/bin after installation"
    exit 1
fi
log "peers ready: $(command -v gearmand || echo /usr/sbin/gearmand), $(command -v gearman), $(command -v gearadmin), $(command -v geard), $pg_bin/pg_ctl"
