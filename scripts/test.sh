#!/usr/bin/env bash
# The whole test suite: unit tests, protocol tests over TCP, whole calls against the fake
# providers, conformance against the vendors' official SDKs. Needs cargo and Node.js/npm.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/sdk-setup.sh  # the official SDKs the conformance tests drive
cargo test --locked "$@"
