#!/usr/bin/env bash
# Long versions of the reliability tests (not run in CI): a soak of
# SOAK_SECS (default 600) seconds and a fuzz run of FUZZ_ITERS (default
# 1,000,000) mutated inputs per reader, in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
SOAK_SECS="${SOAK_SECS:-600}" cargo test --release --test soak -- --nocapture
FUZZ_ITERS="${FUZZ_ITERS:-1000000}" cargo test --release --test fuzz_loader
