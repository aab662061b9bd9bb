"""README "Training with PyTorch", its JAX recipe: the client's numpy arrays
go to the device with jax.device_put, the order is sharded by
jax.process_index() / process_count() (one process here: 0 / 1), and a
jitted step trains on them. jax is a pinned test dependency (CPU).

Run: python3 -m pytest tests/python/test_jax.py  (after `cargo build`)
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from paths import ROOT
sys.path.insert(0, str(ROOT / "clients" / "python"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import minibatch_client as mc  # noqa: E402
from test_client import Daemon  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = Daemon(log_dir=tmp_path_factory.mktemp("jax"))
    yield d.address
    d.stop()


def test_jax_recipe(server):
    @jax.jit
    def train_step(params, x, y):
        def loss(p):
            logits = x @ p["W"] + p["b"]
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])
        cost, g = jax.value_and_grad(loss)(params)
        return jax.tree_util.tree_map(lambda p, d: p - 0.13 * d, params, g), cost

    params = {"W": jnp.zeros((784, 10), jnp.float32), "b": jnp.zeros(10, jnp.float32)}
    costs, seen = [], []
    with mc.Client(server) as c:
        for epoch in range(2):
            for x, y, idx in c.epoch("train", 500, shuffle=True, seed=1, epoch=epoch, rank=jax.process_index(),
                                     world_size=jax.process_count(), x_dtype="uint8", decode=True,
                                     with_indices=True):
                xd, yd = jax.device_put(x), jax.device_put(y)
                assert np.array_equal(np.asarray(xd), x) and xd.dtype == jnp.float32
                params, cost = train_step(params, xd, yd)
                costs.append(float(cost))
                seen.append(idx)
    assert (jax.process_index(), jax.process_count()) == (0, 1)
    assert sorted(np.concatenate(seen[:6]).tolist()) == list(range(3000))
    assert costs[-1] < costs[0] * 0.8, costs
