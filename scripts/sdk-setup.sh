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
