#!/usr/bin/env bash
# Build sifucall and install it as a systemd service. Safe to run again: it upgrades the
# binary and unit, never overwrites an existing config or env file, and restarts the service
# only when the binary or unit changed.
#
# Usage: deploy/install.sh            (as a user with sudo, or as root)
#        SKIP_BUILD=1 deploy/install.sh   (install an already-built target/release/sifucall)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bin_dst=/usr/local/bin/sifucall
etc=/etc/sifucall
unit_dst=/etc/systemd/system/sifucall.service
doc_dir=/usr/local/share/doc/sifucall

if [[ $EUID -eq 0 ]]; then
    SUDO=()
else
    command -v sudo >/dev/null || { echo "run as root or install sudo" >&2; exit 1; }
    SUDO=(sudo)
fi

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    command -v cargo >/dev/null || { echo "cargo not found (install Rust, or build elsewhere and use SKIP_BUILD=1)" >&2; exit 1; }
    echo "==> building (cargo build --release --locked)"
    cargo build --release --locked
fi
[[ -x target/release/sifucall ]] || { echo "target/release/sifucall missing; build first" >&2; exit 1; }

changed=0

echo "==> installing $bin_dst"
if ! cmp -s target/release/sifucall "$bin_dst"; then
    # install(1) writes a new file and renames it, so a running daemon keeps its old inode.
    "${SUDO[@]}" install -m 0755 -o root -g root target/release/sifucall "$bin_dst"
    changed=1
fi

echo "==> configuration in $etc"
"${SUDO[@]}" install -d -m 0755 -o root -g root "$etc"
if "${SUDO[@]}" test -e "$etc/sifucall.toml"; then
    echo "    $etc/sifucall.toml exists, left as is (compare with config/default.toml after upgrades)"
else
    "${SUDO[@]}" install -m 0644 -o root -g root config/default.toml "$etc/sifucall.toml"
    # Under systemd the state directory is writable: keep call records there by default.
    "${SUDO[@]}" sed -i '/^\[records\]/,/^\[/ s|^url = ""$|url = "file:///var/lib/sifucall/calls.jsonl"|' "$etc/sifucall.toml"
    echo "    created $etc/sifucall.toml from config/default.toml (call records in /var/lib/sifucall/calls.jsonl)"
fi
if "${SUDO[@]}" test -e "$etc/sifucall.env"; then
    echo "    $etc/sifucall.env exists, left as is"
else
    "${SUDO[@]}" install -m 0600 -o root -g root deploy/sifucall.env.example "$etc/sifucall.env"
    echo "    created $etc/sifucall.env: put the API keys in it"
fi
# Secrets: whatever happened before, the env file is root-only.
"${SUDO[@]}" chown root:root "$etc/sifucall.env"
"${SUDO[@]}" chmod 0600 "$etc/sifucall.env"

"${SUDO[@]}" install -d -m 0755 "$doc_dir"
"${SUDO[@]}" install -m 0644 deploy/README.md "$doc_dir/README.md"

echo "==> installing $unit_dst"
if ! cmp -s deploy/sifucall.service "$unit_dst"; then
    "${SUDO[@]}" install -m 0644 -o root -g root deploy/sifucall.service "$unit_dst"
    changed=1
fi

"${SUDO[@]}" systemctl daemon-reload
was_active=0
"${SUDO[@]}" systemctl is-active --quiet sifucall && was_active=1
"${SUDO[@]}" systemctl enable --now sifucall
if [[ $was_active -eq 1 && $changed -eq 1 ]]; then
    echo "==> restarting sifucall (calls in progress get up to shutdown_grace_secs to finish)"
    "${SUDO[@]}" systemctl restart sifucall
fi

echo "==> done"
"${SUDO[@]}" systemctl --no-pager --lines=0 status sifucall || true
echo
echo "Check:  journalctl -u sifucall -f    and    curl -s 127.0.0.1:9090/readyz"
