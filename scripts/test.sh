#!/usr/bin/env bash
# The whole test suite: unit tests, protocol tests over TCP, whole calls against the fake
# providers, and conformance tests that drive the vendors' official SDKs against the fakes.
# Needs cargo and Python >= 3.9 with venv (scripts/sdk-setup.sh installs the SDKs).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/sdk-setup.sh
cargo test --locked "$@"
