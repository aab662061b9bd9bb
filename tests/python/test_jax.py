"""README "Training with PyTorch", its JAX recipe: the client's numpy arrays
go to the device with jax.device_put, the order is sharded by
jax.process_index() / process_count() (one process here: 0 / 1), and a
jitted step trains on them. jax is a pinned test dependency (CPU).

The recipe runs in a child process: jax starts threads when imported, and
the PyTorch tests fork (DataLoader workers), which must not happen in a
process where jax runs.

Run: python3 -m pytest tests/python/test_jax.py  (after `cargo build`)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from paths import ROOT
from test_client import Daemon

RECIPE = r'''
import json, sys
import numpy as np
import jax
import jax.numpy as jnp
from minibatch_client import Client

@jax.jit
def train_step(params, x, y):
    def loss(p):
        logits = x @ p["W"] + p["b"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])
    cost, g = jax.value_and_grad(loss)(params)
    return jax.tree_util.tree_map(lambda p, d: p - 0.13 * d, params, g), cost

params = {"W": jnp.zeros((784, 10), jnp.float32), "b": jnp.zeros(10, jnp.float32)}
costs, seen, same = [], [], True
with Client(sys.argv[1]) as c:
    for epoch in range(2):
        for x, y, idx in c.epoch("train", 500, shuffle=True, seed=1, epoch=epoch, rank=jax.process_index(),
                                 world_size=jax.process_count(), x_dtype="uint8", decode=True, with_indices=True):
            xd, yd = jax.device_put(x), jax.device_put(y)
            same &= bool(np.array_equal(np.asarray(xd), x)) and xd.dtype == jnp.float32
            params, cost = train_step(params, xd, yd)
            costs.append(float(cost))
            seen.append(idx.tolist())
print(json.dumps({"process": [jax.process_index(), jax.process_count()], "costs": costs, "seen": seen,
                  "same": same}))
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = Daemon(log_dir=tmp_path_factory.mktemp("jax"))
    yield d.address
    d.stop()


def test_jax_recipe(server):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "clients" / "python"), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", RECIPE, server], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["process"] == [0, 1] and out["same"]
    assert sorted(i for b in out["seen"][:6] for i in b) == list(range(3000))
    assert out["costs"][-1] < out["costs"][0] * 0.8, out["costs"]
