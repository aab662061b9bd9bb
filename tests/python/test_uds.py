"""The Python client over the daemon's Unix domain socket (`serve --uds`):
the same minibatches as over TCP, the bearer token applies there too, and
SIGTERM removes the socket file.

Run: python3 -m pytest tests/python/test_uds.py  (after `cargo build`)
"""
from __future__ import annotations

import signal
import stat
import sys
import time

import numpy as np
import pytest

from paths import ROOT
sys.path.insert(0, str(ROOT / "clients" / "python"))

import minibatch_client as mc  # noqa: E402
from test_client import Daemon  # noqa: E402

TOKEN = "uds-python-token"


def _wait_for(path, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_get_batch_over_the_unix_socket_equals_tcp(tmp_path):
    sock = tmp_path / "minibatchd.sock"
    d = Daemon("--uds", str(sock), "--auth-token", TOKEN, "--shutdown-grace-secs", "1",
               log_dir=tmp_path)
    try:
        _wait_for(sock)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        assert stat.S_ISSOCK(sock.stat().st_mode)
        with mc.Client("unix://" + str(sock), token=TOKEN, timeout=30) as u, \
                mc.Client(d.address, token=TOKEN, timeout=30) as t:
            assert u.health()
            for set_, index, size in [("train", 0, 500), ("valid", 1, 600), ("test", 3, 7)]:
                ux, uy = u.get_batch(set_, index, size)
                tx, ty = t.get_batch(set_, index, size)
                assert ux.dtype == tx.dtype and uy.dtype == ty.dtype
                assert np.array_equal(ux, tx) and np.array_equal(uy, ty)
        with mc.Client("unix://" + str(sock), timeout=30) as anonymous:
            with pytest.raises(mc.Unauthenticated):
                anonymous.get_batch("train", 0, 10)
        d.kill(signal.SIGTERM)
        assert d.proc.returncode == 0, d.log.read_text()[-2000:]
        assert not sock.exists(), "SIGTERM removes the socket file"
    finally:
        d.stop()
