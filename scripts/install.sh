#!/usr/bin/env bash
# Install mars: marsd and marsadm, the systemd units, the man pages and the
# shell completions. As root:
#
#   scripts/install.sh                  # builds release binaries, installs under /usr/local
#   PREFIX=/usr scripts/install.sh      # binaries in /usr/bin (the units are rewritten to match)
#
# Variables: PREFIX (default /usr/local); DESTDIR (a staging root, for
# packaging; default none); SYSTEMD_UNIT_DIR (default /etc/systemd/system);
# MARS_BIN_DIR (take marsd and marsadm from there instead of building them).
# Nothing is enabled or started: see "Operating mars" in README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
SYSTEMD_UNIT_DIR=${SYSTEMD_UNIT_DIR:-/etc/systemd/system}
if [ -z "${MARS_BIN_DIR:-}" ]; then
    cargo build --release --locked -p mars --bin marsd --bin marsadm
    MARS_BIN_DIR=${CARGO_TARGET_DIR:-target}/release
fi
for b in marsd marsadm; do
    [ -x "$MARS_BIN_DIR/$b" ] || { echo "install.sh: $MARS_BIN_DIR/$b is not there (build it, or unset MARS_BIN_DIR)" >&2; exit 1; }
done
root=$DESTDIR
install -d -m 0755 "$root$PREFIX/bin" "$root$SYSTEMD_UNIT_DIR" \
    "$root$PREFIX/share/man/man1" "$root$PREFIX/share/man/man8" \
    "$root$PREFIX/share/bash-completion/completions" \
    "$root$PREFIX/share/zsh/site-functions" \
    "$root$PREFIX/share/fish/vendor_completions.d" \
    "$root/etc/mars/resource.d"
install -m 0755 "$MARS_BIN_DIR/marsd" "$MARS_BIN_DIR/marsadm" "$root$PREFIX/bin/"
for u in contrib/systemd/*.service; do
    sed "s#/usr/local/bin/#$PREFIX/bin/#g" "$u" >"$root$SYSTEMD_UNIT_DIR/$(basename "$u").tmp"
    chmod 0644 "$root$SYSTEMD_UNIT_DIR/$(basename "$u").tmp"
    mv "$root$SYSTEMD_UNIT_DIR/$(basename "$u").tmp" "$root$SYSTEMD_UNIT_DIR/$(basename "$u")"
done
install -m 0644 man/marsadm.1 "$root$PREFIX/share/man/man1/marsadm.1"
install -m 0644 man/marsd.8 "$root$PREFIX/share/man/man8/marsd.8"
"$MARS_BIN_DIR/marsadm" completions bash >"$root$PREFIX/share/bash-completion/completions/marsadm"
"$MARS_BIN_DIR/marsadm" completions zsh >"$root$PREFIX/share/zsh/site-functions/_marsadm"
"$MARS_BIN_DIR/marsadm" completions fish >"$root$PREFIX/share/fish/vendor_completions.d/marsadm.fish"
echo "installed marsd and marsadm in $root$PREFIX/bin, units in $root$SYSTEMD_UNIT_DIR, man pages and completions in $root$PREFIX/share"
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
echo "next: marsadm --dir /var/lib/mars create-cluster ... (or join-cluster), then systemctl enable --now marsd"
