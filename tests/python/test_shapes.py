"""Examples of other shapes than MNIST's 784 values (issue 15, the Python
side): a daemon serving a small `.npz` in the Keras layout (x_train,
y_train, x_test, y_test) whose x is uint8 images of CIFAR-10's [n, 3, 32,
32], or [n, 28, 28], written here with numpy; the client must follow
GetInfo's shape of one example everywhere: GetBatch on both transports,
the StreamBatches epoch, attach (views and gathers), the torch dataset and
DataLoader, and examples/train_torch.py (which picks its model by it).

The daemon keeps images with channels as they are ([3, 32, 32], Keras's
[32, 32, 3]) and flattens grayscale [28, 28] to MNIST's 784 values; the
bytes must be the file's either way, the decoded floats exactly byte /
scale_divisor.

Run: MINIBATCHD=target/debug/minibatchd python3 -m pytest tests/python/test_shapes.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from paths import ROOT
sys.path.insert(0, str(ROOT / "clients" / "python"))

import minibatch_client as mc  # noqa: E402
from minibatch_client.torch import MinibatchDataset  # noqa: E402
from test_attach import UdsDaemon  # noqa: E402

TRAIN, VALID, TEST = 200, 100, 100  # x_train holds TRAIN + VALID (the daemon splits valid off its end)


@pytest.fixture(scope="module", params=[(3, 32, 32), (32, 32, 3), (28, 28)],
                ids=["cifar-3x32x32", "keras-32x32x3", "28x28"])
def data(request, tmp_path_factory):
    """The arrays written to the .npz, and a daemon serving it (TCP and --uds)."""
    shape = request.param
    rng = np.random.default_rng(sum(shape))
    arrays = {
        "x_train": rng.integers(0, 256, (TRAIN + VALID, *shape), dtype=np.uint8),
        "y_train": rng.integers(0, 10, TRAIN + VALID).astype(np.uint8),
        "x_test": rng.integers(0, 256, (TEST, *shape), dtype=np.uint8),
        "y_test": rng.integers(0, 10, TEST).astype(np.uint8),
    }
    d = tmp_path_factory.mktemp("shapes")
    path = d / "images.npz"
    np.savez(path, **arrays)
    daemon = UdsDaemon(d, "--data", str(path), "--valid-split", str(VALID))
    sets = {"train": (arrays["x_train"][:TRAIN], arrays["y_train"][:TRAIN]),
            "valid": (arrays["x_train"][TRAIN:], arrays["y_train"][TRAIN:]),
            "test": (arrays["x_test"], arrays["y_test"])}
    yield shape, sets, daemon, path
    daemon.stop()


@pytest.fixture(params=["default", "grpcio"])
def client(request, data):
    with mc.Client(data[2].address, timeout=30, native=None if request.param == "default" else False) as c:
        yield c


def rows(x: np.ndarray) -> np.ndarray:
    """Examples as rows of values, whichever shape the daemon keeps."""
    return np.asarray(x).reshape(len(x), -1)


def test_info_names_the_example_shape(client, data):
    shape, sets, _, _ = data
    info = client.info()
    for name, (x, _) in sets.items():
        s = info.sets[name]
        assert s.examples == len(x)
        assert s.x.shape in (shape, (int(np.prod(shape)),)), s.x.shape
        assert s.x.dtype == "uint8" and s.x.scale_divisor > 0 and s.y.shape == ()


def test_get_batch_bytes_and_decoded_values(client, data):
    shape, sets, _, _ = data
    info = client.info()
    for name, (x, y) in sets.items():
        ex = info.sets[name].x
        got_x, got_y = client.get_batch(name, 1, 32)  # a middle minibatch
        assert got_x.shape == (32, *ex.shape) and got_x.dtype == np.uint8
        assert rows(got_x).tobytes() == rows(x[32:64]).tobytes()
        assert got_y.tolist() == y[32:64].tolist()
        last_x, _ = client.get_batch(name, 1, len(x) - 30)  # the last, partial one
        assert last_x.shape == (30, *ex.shape) and rows(last_x).tobytes() == rows(x[-30:]).tobytes()
        dec, _ = client.get_batch(name, 0, 50, decode=True)
        assert dec.dtype == np.float32 and dec.shape == (50, *ex.shape)
        assert np.array_equal(rows(dec), rows(x[:50]).astype(np.float32) / np.float32(ex.scale_divisor))


def test_epoch_stream_gathers_the_examples(client, data):
    shape, sets, _, _ = data
    x, y = sets["train"]
    seen = []
    for bx, by, idx in client.epoch("train", 64, shuffle=True, seed=4, with_indices=True):
        assert bx.shape[1:] == client.info().sets["train"].x.shape and len(bx) == len(idx) <= 64
        assert rows(bx).tobytes() == rows(x[idx]).tobytes() and by.tolist() == y[idx].tolist()
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(TRAIN))
    s = client.stats()
    assert s.minibatches == 4 and s.bytes > TRAIN * int(np.prod(shape))  # x's bytes, y's and the indices


def test_attach_views_and_gathers(data):
    shape, sets, daemon, _ = data
    x, y = sets["train"]
    with mc.Client(daemon.target).attach() as a, mc.Client(daemon.address) as c:
        ex = c.info().sets["train"].x
        assert a.sets["train"].x.shape == (TRAIN, *ex.shape)
        vx, vy = a.batch("train", 1, 64)
        assert vx.shape == (64, *ex.shape) and not vx.flags.writeable
        assert rows(vx).tobytes() == rows(x[64:128]).tobytes() and vy.tolist() == y[64:128].tolist()
        kw = dict(shuffle=True, seed=9, rank=1, world_size=2)
        for (ax, ay), (gx, gy) in zip(a.epoch("train", 40, decode=True, **kw),
                                      c.epoch("train", 40, decode=True, **kw), strict=True):
            assert ax.shape == gx.shape and ax.dtype == gx.dtype == np.float32
            assert ax.tobytes() == gx.tobytes() and ay.tolist() == gy.tolist()


@pytest.mark.parametrize("via", ["address", "target"])
def test_torch_dataset_and_dataloader(data, via):
    shape, sets, daemon, _ = data
    x, y = sets["train"]
    ds = MinibatchDataset(getattr(daemon, via), "train", 64)
    assert ds.example_shape in (shape, (int(np.prod(shape)),))
    with mc.Client(daemon.address) as c:
        divisor = c.info().sets["train"].x.scale_divisor
    n = 0
    for i, (bx, by) in enumerate(ds.timed(DataLoader(ds, batch_size=None))):
        want = x[i * 64:(i + 1) * 64]
        assert bx.dtype == torch.float32 and tuple(bx.shape) == (len(want), *ds.example_shape)
        assert np.array_equal(rows(bx.numpy()), rows(want).astype(np.float32) / np.float32(divisor))
        assert by.tolist() == y[i * 64:(i + 1) * 64].tolist()
        n += len(want)
    assert n == TRAIN
    s = ds.stats()
    assert s.minibatches == len(ds) == 4 and s.bytes == TRAIN * (4 * int(np.prod(shape)) + 8)  # float32 x, int64 y


def test_train_torch_picks_the_model_by_shape(data, tmp_path):
    """examples/train_torch.py, one epoch: the small CNN on 3x32x32 (also
    from Keras's channels-last 32x32x3), LeNet-5 on 28x28 (as MNIST's
    1x28x28), and the per-epoch wait line."""
    shape, _, daemon, _ = data
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "clients" / "python"),
                                                                     os.environ.get("PYTHONPATH")]))}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    m = tmp_path / "m.json"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "train_torch.py"), "--server", daemon.address,
                        "--epochs", "1", "--batch-size", "100", "--shuffle", "--json", str(m)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    want = {(3, 32, 32): "small CNN on 3x32x32 images", (32, 32, 3): "small CNN on 3x32x32 images (channels last)",
            (28, 28): "LeNet-5 on 1x28x28 images"}[shape]
    assert want in r.stdout, r.stdout
    assert "waiting for data: " in r.stdout and "% of step time" in r.stdout, r.stdout
    epoch = json.loads(m.read_text())["epochs"][0]
    assert epoch["steps"] == 2 and 0.0 <= epoch["wait_fraction"] <= 1.0
    assert epoch["minibatch_bytes"] == TRAIN * (4 * int(np.prod(shape)) + 8)
    assert 0.0 <= epoch["valid_error"] <= 1.0 and 0.0 <= epoch["test_error"] <= 1.0
