"""Paths the Python tests share: the repository, the bundled sample, the binary."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "mnist-sample.pkl.gz"


def binary() -> Path:
    """The minibatchd binary: $MINIBATCHD, else target/debug/minibatchd."""
    p = Path(os.environ.get("MINIBATCHD", "target/debug/minibatchd"))
    if not p.is_absolute():
        p = ROOT / p
    if not p.is_file():
        pytest.fail(f"minibatchd binary not found at {p}: run `cargo build` first or set MINIBATCHD", pytrace=False)
    return p
