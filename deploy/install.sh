#!/usr/bin/env bash
# Build sifucall and install it as a systemd service. Safe to run again: it upgrades the
# binary and unit, never overwrites an existing config or env file, and restarts the service
# only when the binary or unit changed AND `sifucall check` passes against the installed
# configuration (otherwise the running service is left exactly as it was).
#
# Usage:
#   deploy/install.sh                    build with cargo (as you), install with sudo
#   sudo deploy/install.sh --binary target/release/sifucall
#                                        install a binary built earlier, e.g. as your user
#                                        with `cargo build --release --locked` (root often
#                                        has no cargo on its PATH)
#   sudo deploy/install.sh --check       only check the installed configuration
#   SKIP_BUILD=1 deploy/install.sh       same as --binary target/release/sifucall
#
# On a fresh machine the API keys are not set yet: the service is installed and enabled but
# not started, and the script prints what to do next.
#
# SIFUCALL_INSTALL_ROOT=DIR installs under DIR instead of / without sudo or chown (for the
# test in scripts/test-install.sh; systemctl is whatever is first on PATH).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

binary=""
check_only=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
        --binary=*) binary="${1#--binary=}"; shift ;;
        --check) check_only=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 1 ;;
    esac
done
if [[ -z "$binary" && "${SKIP_BUILD:-0}" == 1 ]]; then
    binary=target/release/sifucall
fi

root="${SIFUCALL_INSTALL_ROOT:-}"
bin_dst="$root/usr/local/bin/sifucall"
staged="$root/usr/local/bin/.sifucall.new"
etc="$root/etc/sifucall"
unit_dst="$root/etc/systemd/system/sifucall.service"
doc_dir="$root/usr/local/share/doc/sifucall"

if [[ -n "$root" || $EUID -eq 0 ]]; then
    SUDO=()
else
    command -v sudo >/dev/null || { echo "run as root or install sudo" >&2; exit 1; }
    SUDO=(sudo)
fi
# Files owned by root (skipped in a test root, where we may not be root).
if [[ -n "$root" ]]; then OWNER=(); else OWNER=(-o root -g root); fi

is_active() { "${SUDO[@]}" systemctl is-active --quiet sifucall; }

# Runs `sifucall check` with binary $1 against the installed config, with the variables
# from the env file as systemd would pass them (KEY=value lines; quotes and surrounding
# whitespace stripped). --no-bind while the service holds the ports. Settings go to
# /dev/null; problems are printed on stderr.
run_check() {
    local bin="$1" line name value
    local -a vars=(PATH=/usr/sbin:/usr/bin:/sbin:/bin)
    if "${SUDO[@]}" test -r "$etc/sifucall.env"; then
        while IFS= read -r line || [[ -n "$line" ]]; do
            line="${line#"${line%%[![:space:]]*}"}"
            [[ -z "$line" || "$line" == \#* || "$line" == \;* ]] && continue
            [[ "$line" =~ ^([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*=[[:space:]]*(.*)$ ]] || continue
            name="${BASH_REMATCH[1]}"
            value="${BASH_REMATCH[2]}"
            value="${value%"${value##*[![:space:]]}"}"
            if [[ ${#value} -ge 2 && ( ( "$value" == \"*\" ) || ( "$value" == \'*\' ) ) ]]; then
                value="${value:1:${#value}-2}"
            fi
            vars+=("$name=$value")
        done < <("${SUDO[@]}" cat "$etc/sifucall.env")
    fi
    local -a args=(check --config "$etc/sifucall.toml")
    if is_active; then args+=(--no-bind); fi
    "${SUDO[@]}" env -i "${vars[@]}" "$bin" "${args[@]}" >/dev/null
}

next_steps() {
    cat <<EOF

Next steps:
  1. Put the API keys in $etc/sifucall.env (sudoedit $etc/sifucall.env):
     AZURE_SPEECH_KEY, OPENROUTER_API_KEY, ELEVENLABS_API_KEY
     (or set SIFUCALL_AGENT__MODE=echo there for a plumbing test that needs no keys).
  2. Edit $etc/sifucall.toml: at least [audiosocket] listen and allow (the PBX's address).
  3. Check:  sudo $repo/deploy/install.sh --check
  4. Start:  sudo systemctl start sifucall && journalctl -u sifucall -f
EOF
}

if [[ $check_only -eq 1 ]]; then
    echo "==> sifucall check --config $etc/sifucall.toml"
    if run_check "$bin_dst"; then echo "    configuration OK"; exit 0; fi
    echo "    configuration NOT OK (see above)" >&2
    exit 2
fi

if [[ -z "$binary" ]]; then
    if ! command -v cargo >/dev/null; then
        cat >&2 <<EOF
cargo not found on this PATH (under sudo or as root it usually lacks ~/.cargo/bin).
Build as your own user, then install the result:
    cargo build --release --locked
    sudo deploy/install.sh --binary target/release/sifucall
or keep your PATH through sudo:  sudo env "PATH=\$PATH" deploy/install.sh
EOF
        exit 1
    fi
    echo "==> building (cargo build --release --locked)"
    cargo build --release --locked
    binary=target/release/sifucall
fi
[[ -x "$binary" ]] || { echo "$binary missing or not executable; build first (cargo build --release --locked)" >&2; exit 1; }

echo "==> configuration in $etc"
"${SUDO[@]}" install -d -m 0755 "${OWNER[@]}" "$etc"
if "${SUDO[@]}" test -e "$etc/sifucall.toml"; then
    echo "    $etc/sifucall.toml exists, left as is (compare with config/default.toml after upgrades)"
else
    "${SUDO[@]}" install -m 0644 "${OWNER[@]}" config/default.toml "$etc/sifucall.toml"
    # The default records.url is a SQLite database in the state directory, the one place the
    # unit can write.
    echo "    created $etc/sifucall.toml from config/default.toml (call records in /var/lib/sifucall/calls.db)"
fi
if "${SUDO[@]}" test -e "$etc/sifucall.env"; then
    echo "    $etc/sifucall.env exists, left as is"
else
    "${SUDO[@]}" install -m 0600 "${OWNER[@]}" deploy/sifucall.env.example "$etc/sifucall.env"
    echo "    created $etc/sifucall.env: put the API keys in it"
fi
# Secrets: whatever happened before, the env file is root-only.
if [[ -z "$root" ]]; then "${SUDO[@]}" chown root:root "$etc/sifucall.env"; fi
"${SUDO[@]}" chmod 0600 "$etc/sifucall.env"

changed=0
cmp -s "$binary" "$bin_dst" 2>/dev/null || changed=1
"${SUDO[@]}" cmp -s deploy/sifucall.service "$unit_dst" 2>/dev/null || changed=1
was_active=0
is_active && was_active=1

# The new binary checks the existing configuration before anything is replaced.
"${SUDO[@]}" install -d -m 0755 "$(dirname "$bin_dst")"
"${SUDO[@]}" install -m 0755 "${OWNER[@]}" "$binary" "$staged"
echo "==> checking $etc/sifucall.toml with the new binary"
check_ok=1
run_check "$staged" || check_ok=0

if [[ $was_active -eq 1 && $check_ok -eq 0 ]]; then
    "${SUDO[@]}" rm -f "$staged"
    echo "==> NOT upgraded: the configuration fails the new binary's check (above)." >&2
    echo "    The running sifucall, its binary and its unit were left as they were." >&2
    echo "    Fix $etc/sifucall.toml or $etc/sifucall.env, then run this script again." >&2
    exit 1
fi

echo "==> installing $bin_dst"
# A rename: a running daemon keeps its old inode.
"${SUDO[@]}" mv -f "$staged" "$bin_dst"

"${SUDO[@]}" install -d -m 0755 "$doc_dir"
"${SUDO[@]}" install -m 0644 deploy/README.md "$doc_dir/README.md"

echo "==> installing $unit_dst"
"${SUDO[@]}" install -d -m 0755 "$(dirname "$unit_dst")"
"${SUDO[@]}" install -m 0644 "${OWNER[@]}" deploy/sifucall.service "$unit_dst"
"${SUDO[@]}" systemctl daemon-reload
"${SUDO[@]}" systemctl enable sifucall

if [[ $check_ok -eq 0 ]]; then
    echo
    echo "==> sifucall is installed and enabled but NOT started: the configuration is not ready yet"
    echo "    (the problems are listed above; a missing API key is expected on a fresh install)."
    next_steps
    exit 0
fi

if [[ $was_active -eq 1 ]]; then
    if [[ $changed -eq 1 ]]; then
        echo "==> restarting sifucall (calls in progress get up to shutdown_grace_secs to finish)"
        "${SUDO[@]}" systemctl restart sifucall
    else
        echo "==> sifucall is running and nothing changed; not restarted"
    fi
else
    echo "==> starting sifucall"
    "${SUDO[@]}" systemctl start sifucall
fi

echo "==> done"
"${SUDO[@]}" systemctl --no-pager --lines=0 status sifucall || true
echo
echo "Check:  journalctl -u sifucall -f    and    curl -s 127.0.0.1:9090/readyz"
