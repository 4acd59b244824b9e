#!/usr/bin/env bash
# Installs the vendors' official SDKs that the conformance tests drive as reference clients
# of the fake providers (tests/azure_conformance.rs, ...). Idempotent and quiet: run it before
# the tests (scripts/test.sh and .ci/run do). A missing runtime is an error, not a skip.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "sdk-setup: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------
# Azure (Node): microsoft-cognitiveservices-speech-sdk, pinned by tests/sdk/azure/package-lock.json
# ---------------------------------------------------------------------------------------
azure_dir="$repo/tests/sdk/azure"
command -v node >/dev/null || die "node is not installed (Node.js 18+ with npm is needed for the Azure SDK conformance tests)"
command -v npm >/dev/null || die "npm is not installed"
# npm ci only when the lock changed since the last install (node_modules keeps its own copy).
if ! cmp -s "$azure_dir/package-lock.json" "$azure_dir/node_modules/.package-lock.json.installed" 2>/dev/null; then
  (cd "$azure_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
    || die "npm ci failed in tests/sdk/azure"
  cp "$azure_dir/package-lock.json" "$azure_dir/node_modules/.package-lock.json.installed"
fi
# ---------------------------------------------------------------------------------------
# end of Azure (Node)
# ---------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------
# Python SDKs: openai and elevenlabs, pinned exactly by tests/sdk/python/requirements.txt,
# in tests/sdk/python/.venv (tests/openai_conformance.rs, tests/elevenlabs_conformance.rs)
# ---------------------------------------------------------------------------------------
py_dir="$repo/tests/sdk/python"
py_venv="$py_dir/.venv"
find_python() {
  for p in python3.12 python3.11 python3.10 python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
      echo "$p"
      return
    fi
  done
}
python="$(find_python)"
if [ -z "$python" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "sdk-setup: installing python3 and python3-venv"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null; } || true
  python="$(find_python)"
fi
[ -n "$python" ] || die "Python >= 3.9 with venv is not installed (Debian: apt-get install python3 python3-venv)"
# Reinstalled only when the pins changed since the last install.
if ! cmp -s "$py_dir/requirements.txt" "$py_venv/.requirements.installed" 2>/dev/null; then
  rm -rf "$py_venv"
  "$python" -m venv "$py_venv" || die "could not create $py_venv"
  "$py_venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    -r "$py_dir/requirements.txt" || die "pip install failed in tests/sdk/python"
  cp "$py_dir/requirements.txt" "$py_venv/.requirements.installed"
fi
# ---------------------------------------------------------------------------------------
# end of Python SDKs
# ---------------------------------------------------------------------------------------
