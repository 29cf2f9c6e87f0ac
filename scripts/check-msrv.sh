#!/usr/bin/env bash
# Checks the declared minimum Rust version (workspace `rust-version`): every workspace crate
# inherits it, no locked dependency needs a newer compiler, and the toolchain here is at least
# that new. Clippy's `incompatible_msrv` lint (run by .ci/run) catches std APIs newer than it.
set -euo pipefail
cd "$(dirname "$0")/.."
meta="$(mktemp)"
trap 'rm -f "$meta"' EXIT
cargo metadata --format-version 1 --locked >"$meta"
python3 - "$meta" "$(rustc --version)" <<'PY'
import json, sys

def ver(s):
    parts = [int(x) for x in s.split("-")[0].split(".")]
    return tuple(parts + [0] * (3 - len(parts)))

meta = json.load(open(sys.argv[1]))
rustc = sys.argv[2].split()[1]
members = set(meta["workspace_members"])
declared, problems = None, []
for p in meta["packages"]:
    if p["id"] not in members:
        continue
    name, rv = p["name"], p.get("rust_version")
    if rv is None:
        problems.append(f"workspace crate {name} does not inherit rust-version")
    elif declared is None:
        declared = rv
    elif rv != declared:
        problems.append(f"{name} declares rust-version {rv}, the workspace {declared}")
if declared is None:
    sys.exit("check-msrv: no workspace crate declares rust-version")
for p in meta["packages"]:
    name, version, rv = p["name"], p["version"], p.get("rust_version")
    if p["id"] not in members and rv and ver(rv) > ver(declared):
        problems.append(f"dependency {name} {version} needs Rust {rv}, more than {declared}")
if ver(rustc) < ver(declared):
    problems.append(f"rustc {rustc} is older than the declared rust-version {declared}")
for line in problems:
    print("check-msrv:", line, file=sys.stderr)
if problems:
    sys.exit(1)
print(f"check-msrv: rust-version {declared}, inherited by every crate; no dependency needs more; rustc {rustc}")
PY
