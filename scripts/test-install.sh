#!/usr/bin/env bash
# Runs deploy/install.sh in a scratch root with a fake systemctl first on PATH, through the
# operator's paths: a fresh machine without keys, adding the keys, an upgrade of a running
# service, an upgrade refused because the config fails the check, --check, and no cargo.
# Nothing outside the scratch directory is installed or started.
#
# Usage: scripts/test-install.sh [path/to/sifucall]   (default target/debug/sifucall)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$(realpath "${1:-$repo/target/debug/sifucall}")"
[[ -x "$bin" ]] || { echo "no binary at $bin (cargo build first)" >&2; exit 1; }

scratch="$(mktemp -d "${TMPDIR:-/tmp}/sifucall-install-test.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
root="$scratch/root"
fakebin="$scratch/fakebin"
log="$scratch/systemctl.log"
mkdir -p "$root" "$fakebin"

# systemctl: records its arguments; "active" is a file; start/restart create it.
cat >"$fakebin/systemctl" <<EOF
#!/usr/bin/env bash
echo "\$*" >>"$log"
case "\$1" in
    is-active) [[ -e "$scratch/active" ]] ;;
    start|restart) touch "$scratch/active" ;;
    *) exit 0 ;;
esac
EOF
chmod +x "$fakebin/systemctl"

failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }

# Runs the installer; sets $out and $rc.
install_sh() {
    : >"$log"
    set +e
    out="$(cd "$repo" && env SIFUCALL_INSTALL_ROOT="$root" PATH="$fakebin:/usr/bin:/bin" \
        HOME="$scratch" bash deploy/install.sh "$@" 2>&1)"
    rc=$?
    set -e
}
expect_rc() { [[ $rc -eq $1 ]] || fail "$2: exit $rc, expected $1"$'\n'"$out"; }
expect_out() { grep -qF -- "$1" <<<"$out" || fail "$2: output lacks '$1'"$'\n'"$out"; }
expect_log() { grep -qxF -- "$1" "$log" || fail "$2: systemctl was not called with '$1'"; }
expect_no_log() { ! grep -q -- "$1" "$log" || fail "$2: systemctl was called with '$1'"; }

env_file="$root/etc/sifucall/sifucall.env"
ports=$'SIFUCALL_AUDIOSOCKET__LISTEN=127.0.0.1:0\nSIFUCALL_ADMIN__LISTEN=127.0.0.1:0'
records="SIFUCALL_RECORDS__URL=file://$scratch/records/calls.jsonl"

# 1. A fresh machine: no keys yet. Installed and enabled, not started, next steps printed.
install_sh --binary "$bin"
expect_rc 0 "fresh"
expect_out "NOT started" "fresh"
expect_out "Next steps" "fresh"
expect_out "AZURE_SPEECH_KEY" "fresh (the check names the missing keys)"
expect_log "enable sifucall" "fresh"
expect_no_log "start" "fresh"
cmp -s "$bin" "$root/usr/local/bin/sifucall" || fail "fresh: binary not installed"
[[ -f "$root/etc/systemd/system/sifucall.service" ]] || fail "fresh: unit not installed"
[[ "$(stat -c %a "$env_file")" == 600 ]] || fail "fresh: env file is not 0600"
grep -q '^url = "sqlite:///var/lib/sifucall/calls.db"' "$root/etc/sifucall/sifucall.toml" \
    || fail "fresh: records url is not the state directory's database in the new config"
[[ ! -e "$root/usr/local/bin/.sifucall.new" ]] || fail "fresh: staged binary left behind"

# 2. The operator adds the keys (one quoted, as some editors do; systemd strips the quotes).
cat >>"$env_file" <<EOF
AZURE_SPEECH_KEY=test-azure-key
OPENROUTER_API_KEY="sk-or-v1-test"
ELEVENLABS_API_KEY=sk_test
$ports
$records
EOF
install_sh --binary "$bin"
expect_rc 0 "keys added"
expect_out "starting sifucall" "keys added"
expect_log "start sifucall" "keys added"

# 3. --check against the installed config.
install_sh --check
expect_rc 0 "--check"
expect_out "configuration OK" "--check"

# 4. Rerun with nothing changed while running: no restart.
install_sh --binary "$bin"
expect_rc 0 "unchanged"
expect_out "nothing changed" "unchanged"
expect_no_log "restart" "unchanged"

# 5. An upgrade of the running service (a different binary): checked, then restarted.
cp "$bin" "$scratch/sifucall-v2"
printf 'v2' >>"$scratch/sifucall-v2"
install_sh --binary "$scratch/sifucall-v2"
expect_rc 0 "upgrade"
expect_log "restart sifucall" "upgrade"
cmp -s "$scratch/sifucall-v2" "$root/usr/local/bin/sifucall" || fail "upgrade: binary not replaced"

# 6. An upgrade while the config is broken: refused, running service and files untouched.
echo "SIFUCALL_LLM__MAX_TOKENS=0" >>"$env_file"
cp "$bin" "$scratch/sifucall-v3"
printf 'v3' >>"$scratch/sifucall-v3"
install_sh --binary "$scratch/sifucall-v3"
expect_rc 1 "broken config"
expect_out "NOT upgraded" "broken config"
expect_out "llm.max_tokens" "broken config"
expect_no_log "restart" "broken config"
expect_no_log "daemon-reload" "broken config"
cmp -s "$scratch/sifucall-v2" "$root/usr/local/bin/sifucall" || fail "broken config: binary replaced"
[[ ! -e "$root/usr/local/bin/.sifucall.new" ]] || fail "broken config: staged binary left behind"
install_sh --check
expect_rc 2 "--check broken"
expect_out "SIFUCALL_LLM__MAX_TOKENS" "--check broken"
sed -i '/^SIFUCALL_LLM__MAX_TOKENS=0$/d' "$env_file"

# 7. No cargo and no --binary: a clear way out instead of a bare "command not found".
install_sh
expect_rc 1 "no cargo"
expect_out "--binary target/release/sifucall" "no cargo"
expect_out 'sudo env "PATH=$PATH"' "no cargo"

if [[ $failures -gt 0 ]]; then
    echo "$failures check(s) failed" >&2
    exit 1
fi
echo "install.sh: all scenarios passed"
