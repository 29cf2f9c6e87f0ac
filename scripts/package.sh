#!/usr/bin/env bash
# Builds the Debian packages into target/debian/ with dpkg-deb (no other tool needed):
#   tebroker        the broker, its systemd unit, /etc/tebroker/tebroker.toml (a conffile), the
#                   system user "tebroker" (postinst) and the state directory /var/lib/tebroker;
#   testenv-agents  testenv-client, testenv-worker, testenv-agent, the templated unit
#                   testenv-worker@.service, the unit testenv-agent.service and the agent's sample
#                   config /etc/testenv-agent/testenv-agent.toml (a conffile).
# Each binary comes with its man pages and bash/zsh/fish completions, generated from its clap
# definitions by crates/cli-docs. Depends come from dpkg-shlibdeps.
# Usage: scripts/package.sh        (a release build first; prints the paths of the packages)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# The binaries of each package. A new binary is one more word here and one more entry in
# crates/cli-docs's BINARIES.
TEBROKER_BINARIES=(tebroker)
AGENT_BINARIES=(testenv-client testenv-worker testenv-agent)
AGENT_UNITS=(testenv-worker@.service testenv-agent.service)
CARGO_PACKAGES=(-p tebroker -p testenv -p testenv-agent -p cli-docs)

target=${CARGO_TARGET_DIR:-$root/target}
out=$target/debian
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
debversion=$version-1
arch=$(dpkg --print-architecture)

cargo build --release --locked "${CARGO_PACKAGES[@]}" >&2

rm -rf "$out/stage" "$out/docs"
mkdir -p "$out"
"$target/release/cli-docs" "$out/docs" >/dev/null

# stage_binary STAGE NAME: the stripped binary, its man pages (gzipped, reproducible) and its
# completions where bash-completion, zsh and fish look for them.
stage_binary() {
    local stage=$1 name=$2 page
    install -D -m 0755 "$target/release/$name" "$stage/usr/bin/$name"
    strip --strip-unneeded "$stage/usr/bin/$name"
    install -d "$stage/usr/share/man/man1"
    for page in "$out/docs/man/$name.1" "$out/docs/man/$name"-*.1; do
        [ -e "$page" ] || continue
        gzip -9n <"$page" >"$stage/usr/share/man/man1/$(basename "$page").gz"
    done
    install -D -m 0644 "$out/docs/completions/bash/$name.bash" \
        "$stage/usr/share/bash-completion/completions/$name"
    install -D -m 0644 "$out/docs/completions/zsh/_$name" \
        "$stage/usr/share/zsh/vendor-completions/_$name"
    install -D -m 0644 "$out/docs/completions/fish/$name.fish" \
        "$stage/usr/share/fish/vendor_completions.d/$name.fish"
}

# stage_unit STAGE UNIT: a unit from contrib/systemd with the packaged binary paths.
stage_unit() {
    install -d "$1/lib/systemd/system"
    sed 's|/usr/local/bin/|/usr/bin/|g' "contrib/systemd/$2" >"$1/lib/systemd/system/$2"
}

# shlibs_depends BINARY...: the Depends line dpkg-shlibdeps computes for the binaries.
shlibs_depends() {
    local scratch
    scratch=$(mktemp -d)
    mkdir "$scratch/debian"
    printf 'Source: tebroker\n\nPackage: tebroker\nArchitecture: any\n' >"$scratch/debian/control"
    (cd "$scratch" && dpkg-shlibdeps -O "$@") | sed -n 's/^shlibs:Depends=//p'
    rm -rf "$scratch"
}

# finish PACKAGE STAGE: control files from packaging/debian/PACKAGE, then dpkg-deb.
finish() {
    local package=$1 stage=$2 depends size file deb
    install -D -m 0644 packaging/debian/copyright "$stage/usr/share/doc/$package/copyright"
    install -d "$stage/DEBIAN"
    for file in postinst prerm postrm; do
        install -m 0755 "packaging/debian/$package/$file" "$stage/DEBIAN/$file"
    done
    [ -e "packaging/debian/$package/conffiles" ] &&
        install -m 0644 "packaging/debian/$package/conffiles" "$stage/DEBIAN/conffiles"
    depends=$(shlibs_depends "$stage"/usr/bin/*)
    size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
    sed -e "s|@VERSION@|$debversion|" -e "s|@ARCH@|$arch|" -e "s|@DEPENDS@|$depends|" \
        -e "s|@INSTALLED_SIZE@|$size|" "packaging/debian/$package/control" >"$stage/DEBIAN/control"
    (cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
        xargs -0 md5sum >DEBIAN/md5sums)
    deb=$out/${package}_${debversion}_$arch.deb
    dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >&2
    echo "$deb"
}

stage=$out/stage/tebroker
for name in "${TEBROKER_BINARIES[@]}"; do stage_binary "$stage" "$name"; done
install -d "$stage/lib/systemd/system"
# The package has its own user (postinst) that owns /var/lib/tebroker across restarts, where
# the contrib unit uses a dynamic one.
sed -e 's|/usr/local/bin/|/usr/bin/|g' -e 's|^DynamicUser=yes$|User=tebroker\nGroup=tebroker|' \
    contrib/systemd/tebroker.service >"$stage/lib/systemd/system/tebroker.service"
install -D -m 0644 contrib/tebroker.toml "$stage/etc/tebroker/tebroker.toml"
finish tebroker "$stage"

stage=$out/stage/testenv-agents
for name in "${AGENT_BINARIES[@]}"; do stage_binary "$stage" "$name"; done
for unit in "${AGENT_UNITS[@]}"; do stage_unit "$stage" "$unit"; done
install -d "$stage/etc/testenv"
install -D -m 0644 contrib/testenv-agent.toml "$stage/etc/testenv-agent/testenv-agent.toml"
finish testenv-agents "$stage"

rm -rf "$out/stage"
