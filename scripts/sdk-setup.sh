#!/usr/bin/env bash
# Installs the vendors' official SDKs that the conformance tests drive against the fakes.
# Idempotent: does nothing when the installed set already matches the pins.
set -euo pipefail
cd "$(dirname "$0")/.."

# Python SDKs
# tests/sdk/python/.venv from tests/sdk/python/requirements.txt (exact pins): the `openai`
# and `elevenlabs` packages, for tests/openai_conformance.rs and tests/elevenlabs_conformance.rs.
py_dir=tests/sdk/python
py_venv="$py_dir/.venv"
py_stamp="$py_venv/.requirements"
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
if [ -z "$python" ]; then
  echo "sdk-setup: Python >= 3.9 with the venv module is required (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! cmp -s "$py_dir/requirements.txt" "$py_stamp" 2>/dev/null; then
  echo "sdk-setup: installing the Python SDKs into $py_venv"
  rm -rf "$py_venv"
  "$python" -m venv "$py_venv"
  "$py_venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    -r "$py_dir/requirements.txt"
  cp "$py_dir/requirements.txt" "$py_stamp"
fi
