#!/usr/bin/env bash
# The whole test suite: unit tests, protocol tests over TCP, whole calls against the fake
# providers. Needs only cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked "$@"
