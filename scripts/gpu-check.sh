#!/usr/bin/env bash
# The device tier's check on a GPU host (issue 13; README "Device memory").
# Runs where there is an NVIDIA driver, torch (and optionally CuPy) but no
# Rust toolchain: build the release binary elsewhere and carry it.
#
#   cargo build --release                  # on the build machine
#   bash scripts/gpu-check.sh [OUT.json]   # on the GPU host, in the repository root
#
# Needs Python with numpy, torch, protobuf and grpcio (the client's
# dependencies); WHEELS=DIR installs missing ones from a wheelhouse made on
# the build machine (pip download -d DIR grpcio protobuf crc32c). Finishes
# in about 2 minutes; the JSON holds every check and figure.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-check.json}}
BIN=${MINIBATCHD:-target/release/minibatchd}
PY=${PYTHON:-python3}
[ -x "$BIN" ] || { echo "FAIL: no binary at $BIN (cargo build --release, then carry it)" >&2; exit 2; }
nvidia-smi -L || echo "nvidia-smi not found (continuing: torch decides)"
if ! "$PY" -c 'import numpy, torch, grpc, google.protobuf' 2>/dev/null; then
  if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" grpcio protobuf crc32c
  else
    echo "FAIL: $PY lacks numpy, torch, grpcio or protobuf (set WHEELS=DIR to install from a wheelhouse)" >&2
    exit 2
  fi
fi
"$PY" -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"'
exec timeout 280 "$PY" scripts/gpu_check.py --binary "$BIN" --out "$OUT"
