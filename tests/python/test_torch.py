"""PyTorch integration (issue 14): minibatch_client.torch.MinibatchDataset
against real daemons serving the bundled sample (train 3000 / valid 1000 /
test 1000), with real torch (a pinned test dependency: its absence fails).

- ranks: shards disjoint, their union the epoch, equal lengths (explicit
  rank/world size, and a real gloo group of two processes where the rank
  comes from torch.distributed); DataLoader workers deliver each minibatch
  once, in order;
- resume: training interrupted mid-epoch and resumed from the state equals
  uninterrupted training bit for bit (deterministic CPU), across
  DataLoader workers and torchdata's StatefulDataLoader too;
- elastic: world size 4 -> checkpoint mid-epoch -> 3, and 2 -> 1, shuffled
  and not: every example of the epoch once, but for the stated truncation;
- refusals: a state of another dataset, set, batch size or seed;
- failover: a replica killed mid-epoch, the epoch completes exactly once;
- attach: the Unix-socket path gives the same minibatches as TCP;
- the trainer (examples/train_torch.py) under torchrun with two ranks,
  interrupted and resumed with one.

Examples are identified by their pixels (the sample's rows are distinct).

Run: python3 -m pytest tests/python/test_torch.py  (after `cargo build`)
"""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torch.utils.data import DataLoader

from paths import ROOT
sys.path.insert(0, str(ROOT / "clients" / "python"))

import minibatch_client as mc  # noqa: E402
from minibatch_client.torch import STATE_FORMAT, MinibatchDataset, worker_context  # noqa: E402
from test_attach import UdsDaemon  # noqa: E402
from test_client import EXAMPLES, Daemon, sample  # noqa: E402,F401  (sample: the fixture)

N = EXAMPLES["train"]


@pytest.fixture(scope="module")
def row_ids(sample):
    """Pixels of a train example -> its index."""
    x = sample["train"][0]
    ids = {x[i].tobytes(): i for i in range(len(x))}
    assert len(ids) == len(x), "the sample's train rows are not distinct"
    return ids


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = UdsDaemon(tmp_path_factory.mktemp("torch"))
    yield d
    d.stop()


def ids_of(x: torch.Tensor, row_ids) -> list[int]:
    a = x.numpy()
    return [row_ids[a[i].tobytes()] for i in range(len(a))]


def loader(ds, workers: int):
    """The dataset itself (workers=0), or a DataLoader with forkserver workers
    (the pytest process holds live gRPC channels: forking it is not safe)."""
    if not workers:
        return ds
    return DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context=worker_context())


def run_pass(ds, row_ids, *, limit=None, workers=0) -> list[list[int]]:
    """The examples of each minibatch of one pass (up to `limit` minibatches)."""
    out = []
    src = loader(ds, workers)
    for x, y in src:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (len(y), 784)
        out.append(ids_of(x, row_ids))
        if limit is not None and len(out) == limit:
            break
    return out


def flat(batches) -> list[int]:
    return [i for b in batches for i in b]


def order(shuffle, epoch=0, seed=7) -> np.ndarray:
    return mc.permutation(N, seed, epoch) if shuffle else np.arange(N)


# --- ranks and workers -------------------------------------------------------------------

@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [2, 7])
def test_shards_disjoint_union_equal_lengths(daemon, row_ids, shuffle, world):
    size = 128
    shards, lengths = [], []
    for r in range(world):
        ds = MinibatchDataset(daemon.address, "train", size, shuffle=shuffle, seed=7, rank=r, world_size=world)
        got = run_pass(ds, row_ids)
        lengths.append(len(ds))
        assert len(got) == len(ds)
        assert all(len(b) == size for b in got[:-1])
        want = mc.epoch_order(N, shuffle=shuffle, seed=7, rank=r, world_size=world)
        assert flat(got) == want.tolist(), f"rank {r}"
        shards.append(flat(got))
    assert len(set(lengths)) == 1, lengths  # DDP must not wait on a rank that ran out
    every = flat(shards)
    assert len(every) == len(set(every)) == (N // world) * world
    assert set(every) == set(order(shuffle)[:(N // world) * world].tolist())


def _gloo_rank(rank, world, init, address, out_dir):
    """One process of a real gloo group: the dataset takes rank and world
    size from torch.distributed (no RANK/WORLD_SIZE in the environment)."""
    os.environ.pop("RANK", None)
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ds = MinibatchDataset(address, "train", 100, shuffle=True, seed=3, epoch=1)
        n = torch.tensor([len(ds)])
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        lens = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(lens, torch.tensor([len(ds)]))
        ys, xs = [], []
        for w in (0, 2):  # in the process, and through two DataLoader workers
            batches = list(loader(ds, w))
            for x, y in batches:  # a DDP-style collective per step: hangs if a rank ran out
                dist.all_reduce(torch.ones(1))
            xs.append(torch.cat([x for x, _ in batches]).numpy())
            ys.append(len(batches))
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), x0=xs[0], x2=xs[1], steps=np.array(ys),
                 lens=np.array([int(t) for t in lens]), state_world=ds.state_dict()["world_size"])
    finally:
        dist.destroy_process_group()


def test_gloo_two_ranks(daemon, row_ids, tmp_path):
    # forkserver, not fork (this process holds gRPC channels), nor spawn (each rank would import torch again)
    worker_context()  # the forkserver's preload, if it is not running yet
    tmp.start_processes(_gloo_rank, args=(2, f"file://{tmp_path}/rendezvous", daemon.address, str(tmp_path)),
                        nprocs=2, join=True, start_method="forkserver")
    shards = []
    for r in range(2):
        f = np.load(tmp_path / f"rank{r}.npz")
        assert f["lens"].tolist() == [15, 15] and f["steps"].tolist() == [15, 15] and int(f["state_world"]) == 2
        a = [row_ids[row.tobytes()] for row in f["x0"]]
        assert a == [row_ids[row.tobytes()] for row in f["x2"]], "workers changed the order"
        assert a == mc.epoch_order(N, shuffle=True, seed=3, epoch=1, rank=r, world_size=2).tolist()
        shards.append(a)
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) + len(shards[1]) == N


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("target", ["tcp", "attach"])
@pytest.mark.parametrize("workers", [2, 3])
def test_dataloader_workers_deliver_each_minibatch_once(daemon, row_ids, target, workers):
    addr = daemon.address if target == "tcp" else daemon.target
    ds = MinibatchDataset(addr, "train", 100, shuffle=True, seed=7, rank=1, world_size=2)
    got = run_pass(ds, row_ids, workers=workers)
    assert len(got) == len(ds) == 15
    assert flat(got) == mc.epoch_order(N, shuffle=True, seed=7, rank=1, world_size=2).tolist()


# --- state and bit-exact resume --------------------------------------------------------------

def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(784, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


def _step(model, opt, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _dataset(address, **kw):
    return MinibatchDataset(address, "train", 250, shuffle=True, seed=11, **kw)


def _train(model, opt, ds, epochs, *, first=0, workers=0, stop_at=None):
    """Trains `epochs` epochs from `first`; with stop_at=(epoch, k), returns
    the state after k minibatches of that epoch."""
    batches = loader(ds, workers)
    for epoch in range(first, epochs):
        ds.set_epoch(epoch)
        for k, (x, y) in enumerate(batches, 1):
            _step(model, opt, x, y)
            if stop_at == (epoch, k):
                return ds.state_dict(consumed=k) if workers else ds.state_dict()
    return None


def _checkpoint(model, opt, data_state) -> dict:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "data": data_state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture
def deterministic():
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("before,after", [(0, 0), (2, 0), (0, 2)], ids=["in-process", "workers-then-not",
                                                                        "not-then-workers"])
def test_resumed_training_equals_uninterrupted_bit_for_bit(daemon, deterministic, before, after):
    epochs = 3  # 12 minibatches of 250 an epoch
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    _train(ref, ref_opt, _dataset(daemon.address), epochs)

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = _train(model, opt, _dataset(daemon.address), epochs, workers=before, stop_at=(1, 5))
    assert state["epoch"] == 1 and state["position"] == 5 and state["offset"] == 0 and state["world_size"] == 1
    ck = _checkpoint(model, opt, state)
    del model, opt

    model = _model()
    torch.nn.init.zeros_(model[0].weight)  # not the reference's start: the checkpoint must restore it
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    ds = _dataset(daemon.address)
    ds.load_state_dict(ck["data"])
    assert len(ds) == 7 and ds.epoch == 1
    _train(model, opt, ds, epochs, first=ds.epoch, workers=after)
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_stateful_dataloader(daemon, deterministic):
    """torchdata's StatefulDataLoader (num_workers=0) checkpoints the dataset
    through its Stateful protocol: resume = uninterrupted, bit for bit."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def run(model, opt, loader, ds, epochs, first=0, stop_at=None):
        for epoch in range(first, epochs):
            ds.set_epoch(epoch)
            for k, (x, y) in enumerate(loader, 1):
                _step(model, opt, x, y)
                if stop_at == (epoch, k):
                    return loader.state_dict()

    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ds = _dataset(daemon.address)
    run(ref, ref_opt, StatefulDataLoader(ds, batch_size=None), ds, 2)

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ds = _dataset(daemon.address)
    sd = run(model, opt, StatefulDataLoader(ds, batch_size=None), ds, 2, stop_at=(0, 4))
    ck = _checkpoint(model, opt, sd)
    model, opt = _model(), None
    model.load_state_dict(ck["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.load_state_dict(ck["optimizer"])
    ds = _dataset(daemon.address)
    sdl = StatefulDataLoader(ds, batch_size=None)
    sdl.load_state_dict(ck["data"])
    run(model, opt, sdl, ds, 2, first=0)
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


class _StateInWorker(MinibatchDataset):
    def __iter__(self):
        try:
            self.state_dict()
            yield "no error"
        except RuntimeError as e:
            yield str(e)


def test_state_dict_in_a_worker_is_refused(daemon):
    """A worker sees only its own minibatches: its state_dict() raises (so
    StatefulDataLoader with workers, which asks each worker, fails loudly at
    its start instead of resuming wrongly; not run here, as its failed
    workers take 10 s to reap)."""
    (msg,) = loader(_StateInWorker(daemon.address, "train", 100), 1)
    assert "in a DataLoader worker" in msg and "state_dict(consumed=k)" in msg, msg


class _ForkWarnings(MinibatchDataset):
    def __iter__(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().__iter__()  # checks and plans the pass; fetches nothing
        yield [str(w.message) for w in caught]


def test_a_worker_forked_after_grpc_warns(daemon):
    """grpcio is not fork-safe: a worker forked from a process where the
    dataset used gRPC says so (and names worker_context()); forkserver
    workers, and attached datasets, do not."""
    ds = _ForkWarnings(daemon.address, "train", 100)
    len(ds)  # GetInfo, over gRPC, in this process
    (msgs,) = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork")
    assert len(msgs) == 1 and "not fork-safe" in msgs[0] and "worker_context()" in msgs[0], msgs
    (msgs,) = loader(ds, 1)
    assert msgs == []
    attached = _ForkWarnings(daemon.target, "train", 100)
    len(attached)
    (msgs,) = DataLoader(attached, batch_size=None, num_workers=1, multiprocessing_context="fork")
    assert msgs == []


def test_state_names_the_run_and_end_of_epoch(daemon, row_ids):
    ds = MinibatchDataset(daemon.address, "train", 1000, shuffle=True, seed=2, drop_last=True, epoch=4)
    s = ds.state_dict()
    fp = mc.Client(daemon.address).info().fingerprint
    assert s == {"format": STATE_FORMAT, "fingerprint": fp, "set": "train", "examples": N, "batch_size": 1000,
                 "shuffle": True, "seed": 2, "drop_last": True, "epoch": 4, "world_size": 1, "offset": 0,
                 "position": 0}
    it = iter(ds)
    next(it)
    assert ds.state_dict()["position"] == 1
    assert len(list(it)) == 2
    done = ds.state_dict()
    assert done["position"] == 3 and done["epoch"] == 4
    # resuming a finished epoch: nothing left; the next epoch starts at its beginning
    again = MinibatchDataset(daemon.address, "train", 1000, shuffle=True, seed=2, drop_last=True)
    again.load_state_dict(done)
    assert len(again) == 0 and list(again) == []
    again.set_epoch(5)
    assert len(again) == 3
    assert flat(run_pass(again, row_ids)) == mc.permutation(N, 2, 5).tolist()
    # the same epoch, iterated again without set_epoch, starts over
    assert len(ds) == 3 and len(list(ds)) == 3


@pytest.fixture(scope="module")
def other_daemon(tmp_path_factory, sample):
    """The sample with one pixel changed: same shapes, another fingerprint."""
    d = tmp_path_factory.mktemp("other")
    sets = [(x.copy(), y.copy()) for x, y in sample.values()]
    sets[0][0][0, 300] = 0.5 if sets[0][0][0, 300] != 0.5 else 0.25
    path = d / "other.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(tuple(sets), f)
    daemon = Daemon("--data", str(path), log_dir=d)
    yield daemon
    daemon.stop()


def test_another_dataset_set_batch_size_or_order_is_refused(daemon, other_daemon):
    ds = MinibatchDataset(daemon.address, "train", 100, shuffle=True, seed=1)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = ds.state_dict()
    other = MinibatchDataset(other_daemon.address, "train", 100, shuffle=True, seed=1)
    assert other.fingerprint != ds.fingerprint
    cases = [
        (other, "fingerprint", ds.fingerprint, other.fingerprint),
        (MinibatchDataset(daemon.address, "valid", 100, shuffle=True, seed=1), "set", "'train'", "'valid'"),
        (MinibatchDataset(daemon.address, "train", 50, shuffle=True, seed=1), "batch_size", "100", "50"),
        (MinibatchDataset(daemon.address, "train", 100, shuffle=True, seed=2), "seed", "1", "2"),
        (MinibatchDataset(daemon.address, "train", 100, shuffle=False, seed=1), "shuffle", "True", "False"),
    ]
    for target, key, saved, mine in cases:
        with pytest.raises(ValueError) as e:
            target.load_state_dict(state)
        msg = str(e.value)
        assert key in msg and saved in msg and mine in msg, msg
        assert target.state_dict()["position"] == 0  # nothing taken over
    with pytest.raises(ValueError, match="not a MinibatchDataset state"):
        ds.load_state_dict({"epoch": 1})
    ds.load_state_dict(state)  # its own state loads
    assert len(ds) == 30 - 3


# --- elastic resume --------------------------------------------------------------------------

@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("before,after,size,k", [(4, 3, 64, 5), (2, 1, 64, 7), (1, 3, 100, 4), (3, 5, 50, 19)])
@pytest.mark.parametrize("target", ["tcp", "attach"])
def test_elastic_resume_every_example_once(daemon, row_ids, shuffle, before, after, size, k, target):
    """`before` ranks consume k minibatches each, checkpoint (rank 0's
    state; every rank's is the same), `after` ranks resume and finish the
    epoch: each example at most once; what is left out is the truncation of
    the rest to a multiple of `after`, at most after-1 examples at the end
    of the epoch's order. Then the next epoch starts at offset 0."""
    addr = daemon.address if target == "tcp" else daemon.target
    kw = dict(shuffle=shuffle, seed=7, epoch=2)
    first = [MinibatchDataset(addr, "train", size, rank=r, world_size=before, **kw) for r in range(before)]
    seen = []
    for ds in first:
        seen += flat(run_pass(ds, row_ids, limit=k))
    states = [ds.state_dict() for ds in first]
    assert all(s == states[0] for s in states) and states[0]["position"] == k
    offset = k * size * before
    assert sorted(seen) == sorted(order(shuffle, 2)[:offset].tolist()), "the consumed positions are a prefix"

    second = [MinibatchDataset(addr, "train", size, rank=r, world_size=after, **kw) for r in range(after)]
    lengths = []
    for ds in second:
        ds.load_state_dict(states[0])
        s = ds.state_dict()
        assert (s["epoch"], s["offset"], s["position"], s["world_size"]) == (2, offset, 0, after)
        lengths.append(len(ds))
        got = run_pass(ds, row_ids)
        assert len(got) == lengths[-1]
        seen += flat(got)
    assert len(set(lengths)) == 1
    assert len(seen) == len(set(seen)), "an example came twice"
    cut = offset + (N - offset) // after * after
    assert N - cut < after
    assert sorted(seen) == sorted(order(shuffle, 2)[:cut].tolist())

    # a checkpoint at the epoch's end resumes with nothing left, under any world size
    end = second[0].state_dict()
    assert end["position"] == lengths[0]
    for w in (1, after + 1):
        ds = MinibatchDataset(addr, "train", size, rank=0, world_size=w, **kw)
        ds.load_state_dict(end)
        assert len(ds) == 0 and list(ds) == []
    # the next epoch: offset 0, the whole order re-strided
    ds = second[-1]
    ds.set_epoch(3)
    assert ds.state_dict()["offset"] == 0
    assert flat(run_pass(ds, row_ids)) == mc.epoch_order(N, shuffle=shuffle, seed=7, epoch=3, rank=after - 1,
                                                          world_size=after).tolist()


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_elastic_with_dataloader_workers(daemon, row_ids):
    """4 ranks with 2 workers each checkpoint via consumed=k; 3 ranks with 3 workers finish."""
    seen = []
    first = [MinibatchDataset(daemon.address, "train", 64, shuffle=True, seed=1, rank=r, world_size=4)
             for r in range(4)]
    for ds in first:
        seen += flat(run_pass(ds, row_ids, limit=6, workers=2))
    state = first[0].state_dict(consumed=6)
    for r in range(3):
        ds = MinibatchDataset(daemon.address, "train", 64, shuffle=True, seed=1, rank=r, world_size=3)
        ds.load_state_dict(state)
        seen += flat(run_pass(ds, row_ids, workers=3))
    assert len(seen) == len(set(seen))
    offset = 6 * 64 * 4
    assert sorted(seen) == sorted(mc.permutation(N, 1, 0)[:offset + (N - offset) // 3 * 3].tolist())


# --- failover and attach ---------------------------------------------------------------------

def test_replica_killed_mid_epoch_completes_exactly_once(tmp_path, row_ids):
    daemons = [Daemon("--shutdown-grace-secs", "0", log_dir=tmp_path) for _ in range(3)]
    try:
        by_address = {d.address: d for d in daemons}
        kw = dict(shuffle=True, seed=5, epoch=1)
        # a stream (num_workers=0): SIGKILL the server that streams, after minibatch 2
        ds = MinibatchDataset([d.address for d in daemons[:2]], "train", 50, prefetch=1, **kw)
        got = []
        for x, _ in ds:
            got.append(ids_of(x, row_ids))
            if len(got) == 2:
                victim = ds._conn[1].last_address
                by_address[victim].kill()
        assert flat(got) == mc.permutation(N, 5, 1).tolist() and len(got) == 60
        assert [f.address for f in ds.failovers] == [victim], ds.failovers
        print(f"\nfailover from {victim} at minibatch {ds.failovers[0].next_index}")
        # DataLoader workers (GetBatch, round-robin): kill one of two live servers mid-epoch
        live = [d for d in daemons if d.address != victim]
        ds = MinibatchDataset([d.address for d in live], "train", 50, **kw)
        got = []
        for x, _ in loader(ds, 2):
            got.append(ids_of(x, row_ids))
            if len(got) == 10:
                live[0].kill()
        assert flat(got) == mc.permutation(N, 5, 1).tolist()
    finally:
        for d in daemons:
            d.stop()


def _tensors(ds, workers=0):
    return [(x.clone(), y.clone()) for x, y in loader(ds, workers)]


@pytest.mark.parametrize("kw", [
    dict(),
    dict(shuffle=True, seed=9, epoch=3, rank=2, world_size=3),
    dict(shuffle=True, seed=9, rank=0, world_size=2, drop_last=True, x_dtype="uint8"),
    dict(shuffle=True, seed=9, rank=1, world_size=2, x_dtype="uint8", decode=False),
])
@pytest.mark.parametrize("workers", [0, 2])
def test_attach_equals_tcp(daemon, kw, workers):
    tcp = _tensors(MinibatchDataset(daemon.address, "train", 128, **kw), workers)
    uds = _tensors(MinibatchDataset(daemon.target, "train", 128, **kw), workers)
    assert len(tcp) == len(uds) > 0
    for (a, b), (c, d) in zip(tcp, uds):
        assert a.dtype == c.dtype and torch.equal(a, c) and torch.equal(b, d)
    if kw.get("decode") is False:
        assert tcp[0][0].dtype == torch.uint8


def test_attach_equals_tcp_after_an_elastic_resume(daemon):
    first = MinibatchDataset(daemon.address, "train", 100, shuffle=True, seed=4, rank=0, world_size=4)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    out = []
    for addr in (daemon.address, daemon.target):
        ds = MinibatchDataset(addr, "train", 100, shuffle=True, seed=4, rank=1, world_size=3)
        ds.load_state_dict(state)
        out.append(_tensors(ds))
    assert len(out[0]) == len(out[1]) == -(-((N - 1200) // 3) // 100)
    for (a, b), (c, d) in zip(*out):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_tensors_zero_copy_and_dtypes(daemon):
    ds = MinibatchDataset(daemon.address, "train", 64, x_dtype="bfloat16", decode=False)
    x, y = next(iter(ds))
    assert x.dtype == torch.bfloat16 and x.shape == (64, 784) and y.dtype == torch.int64
    ds = MinibatchDataset(daemon.address, "train", 64, x_dtype="bfloat16")
    x32, _ = next(iter(ds))
    assert torch.equal(x.float(), x32)
    with pytest.warns(UserWarning, match="no CUDA"):
        x, _ = next(iter(MinibatchDataset(daemon.address, "train", 64, pin_memory=True)))
    assert x.device.type == "cpu"


# --- wait accounting (issue 16) -----------------------------------------------------------------

def _nbytes(batches) -> int:
    return sum(x.numel() * x.element_size() + y.numel() * y.element_size() for x, y in batches)


@pytest.mark.parametrize("target", ["address", "target"])
def test_stats_of_the_dataset_itself(daemon, target):
    """Iterated directly (what a DataLoader without workers does), the dataset
    times its own next(): one count per minibatch, their bytes, wait + busy
    its wall time; a 20 ms step waits for a small share of it."""
    ds = MinibatchDataset(getattr(daemon, target), "train", 100, shuffle=True, seed=1)
    got = []
    for x, y in ds:  # the first next() connects too: 30 steps of 20 ms outweigh it by far
        got.append((x, y))
        time.sleep(0.02)
    s = ds.stats(reset=True)
    assert (s.minibatches, s.bytes) == (len(ds), _nbytes(got)) == (30, _nbytes(got))
    assert s.wait_seconds + s.busy_seconds == pytest.approx(s.wall_seconds, rel=1e-6, abs=1e-6)
    assert s.busy_seconds >= 29 * 0.02 * 0.9 and s.wait_fraction < 0.5, s
    if target == "address":  # the TCP epoch stream prefetches, and the dataset watches its queue
        assert s.prefetch_depth == 2 and s.prefetch_ready_mean is not None
    else:
        assert s.prefetch_ready_mean is None
    assert ds.stats().minibatches == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_stats_at_the_dataloader_boundary(daemon, workers):
    """ds.timed(loader) times next() on the DataLoader in the trainer's
    process: every minibatch counted once (not again by the dataset when it
    iterates in this process), with workers too, whose own counts stay in
    their processes."""
    ds = MinibatchDataset(daemon.address, "train", 250, shuffle=True, seed=1)
    dl = loader(ds, workers) if workers else DataLoader(ds, batch_size=None)
    got = [(x, y) for x, y in ds.timed(dl)]
    s = ds.stats()
    assert (s.minibatches, s.bytes) == (len(got), _nbytes(got)) == (12, _nbytes(got))
    assert 0.0 <= s.wait_fraction <= 1.0 and s.wait_p50 <= s.wait_p99 <= s.wait_max
    # the same dataset iterated again without timed(): counted by the dataset itself, once
    ds.reset_stats()
    assert sum(1 for _ in ds) == 12 and ds.stats().minibatches == 12


# --- the trainer -----------------------------------------------------------------------------

def _trainer(tmp_path, *args, nproc=1):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "clients" / "python")}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, str(ROOT / "examples" / "train_torch.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "0",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"] + cmd[1:]
    r = subprocess.run(cmd + ["--deterministic", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout


def test_trainer_ddp_checkpoint_and_resume(daemon, tmp_path):
    """examples/train_torch.py: two gloo ranks (torchrun) stopped mid-epoch,
    resumed with one rank: the resumed pass takes the rest of the epoch."""
    ck = tmp_path / "ck.pt"
    common = ["--server", daemon.address, "--batch-size", "250", "--shuffle", "--seed", "3", "--epochs", "1",
              "--checkpoint", str(ck)]
    out = _trainer(tmp_path, *common, "--stop-after", "2", nproc=2)  # 6 steps an epoch with 2 ranks
    assert "stopped after step 2" in out, out
    saved = torch.load(ck, weights_only=True)["data"]
    assert (saved["epoch"], saved["position"], saved["world_size"], saved["offset"]) == (0, 2, 2, 0)
    out = _trainer(tmp_path, *common, "--resume", str(ck), "--json", str(tmp_path / "m.json"))
    assert "8 minibatches left in the epoch" in out, out  # 3000 - 2*250*2 = 2000 examples, 1 rank
    m = json.loads((tmp_path / "m.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [0] and m["epochs"][0]["steps"] == 8
    assert m["epochs"][0]["test_error"] < 0.6, m
    end = torch.load(ck, weights_only=True)["data"]
    assert (end["epoch"], end["position"], end["world_size"], end["offset"]) == (0, 8, 1, 1000)


def test_trainer_resume_equals_uninterrupted(daemon, tmp_path):
    """examples/train_torch.py, one process: stopped after 2 of 6 steps and
    resumed, it ends with the weights of an uninterrupted run, bit for bit."""
    common = ["--server", daemon.address, "--batch-size", "500", "--shuffle", "--seed", "5", "--epochs", "1"]
    _trainer(tmp_path, *common, "--save", str(tmp_path / "ref.pt"))
    _trainer(tmp_path, *common, "--checkpoint", str(tmp_path / "ck.pt"), "--stop-after", "2")
    _trainer(tmp_path, *common, "--resume", str(tmp_path / "ck.pt"), "--save", str(tmp_path / "resumed.pt"))
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
