#!/usr/bin/env python3
"""LeNet-5 on MNIST in PyTorch, the deeplearning.net tutorial's convolutional
network (convolutional_mlp.py), or a small CNN on CIFAR-10-shaped data (x of
3x32x32 per example), with every minibatch from minibatchd
through minibatch_client.torch.MinibatchDataset; DDP on CPU (gloo) under
torchrun; checkpoint mid-epoch and resume exactly, with any number of ranks.

    target/debug/minibatchd serve --addr 127.0.0.1:50051 &      # the bundled sample
    torchrun --nproc_per_node 2 examples/train_torch.py --server 127.0.0.1:50051 \\
        --checkpoint ckpt.pt --checkpoint-every 2
    # interrupted? resume from the checkpoint, with 2 ranks or any other number:
    torchrun --nproc_per_node 3 examples/train_torch.py --server 127.0.0.1:50051 --resume ckpt.pt
    # single process, or the same training on tensors loaded here, for comparison:
    python examples/train_torch.py --server 127.0.0.1:50051
    python examples/train_torch.py --data-file data/mnist-sample.pkl.gz
    # CIFAR-10 as downloaded (cifar-10-python.tar.gz; or a Keras-layout .npz):
    target/debug/minibatchd serve --addr 127.0.0.1:50052 --data cifar-10-python.tar.gz --valid-split 5000 &
    python examples/train_torch.py --server 127.0.0.1:50052

The model follows the shape of one example of x (GetInfo): 784, 28x28 or
1x28x28 values train LeNet-5 on 1x28x28 images; 3072 or 3x32x32 train the
small CNN on 3x32x32 (channels first, as CIFAR-10's own files and the
.npz above hold them; a daemon that flattens x to 3072 values per example
keeps that order); other image shapes (C, H, W) or (H, W) go to the
small CNN too.

The model, as in the tutorial: x as [N, 1, 28, 28]; conv 20 5x5, max-pool
2x2, tanh; conv 50 5x5, max-pool 2x2, tanh; fully connected 800 -> 500,
tanh; softmax 10 (mean negative log-likelihood); the tutorial's
initialisation (uniform +-sqrt(6 / (fan_in + fan_out)), zero biases, zero
logistic layer); plain SGD, learning rate 0.1, minibatches of 500 per rank
(--batch-size; with w ranks a step sees w * 500 examples). Each epoch prints
the validation and test errors (errors / examples, each rank evaluating its
shard, summed over ranks), the seconds the epoch's training took, and the
fraction of step time spent waiting for data: MinibatchDataset.timed()
times next() on the DataLoader in the trainer's process (the library's wait
accounting, minibatch_client.stats), against the time between those calls
(forward, backward, the optimizer step), summed over ranks.

Checkpoint (--checkpoint PATH, every --checkpoint-every steps and at each
epoch's end; written by rank 0, atomically): the model, the optimizer and
the dataset's state (MinibatchDataset.state_dict: fingerprint, epoch,
position, world size, ...) in one file. --resume PATH continues from it: the
same epoch, from the next minibatch; with another world size the rest of
the epoch is re-strided over the new ranks (README "Training with
PyTorch"). --stop-after N ends the run after N steps (with a checkpoint):
an interruption, for trying resume. --deterministic (fixed seeds,
deterministic algorithms, one thread) makes an interrupted and resumed run
end with the same weights, bit for bit, as an uninterrupted one.
--data-file PATH trains on arrays loaded here in the same order (no
checkpoints): the reference for the daemon's epoch time.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

ROOT = Path(__file__).resolve().parents[1]

if (ROOT / "clients" / "python" / "minibatch_client").is_dir():  # in a checkout: its own client
    sys.path.insert(0, str(ROOT / "clients" / "python"))
import minibatch_client  # noqa: E402
from minibatch_client.stats import WaitMeter, nbytes  # noqa: E402
from minibatch_client.torch import MinibatchDataset, dist_rank_world, worker_context  # noqa: E402

SETS = ("train", "valid", "test")


def channels_last(example_shape) -> bool:
    """Whether examples are H x W x C (Keras's CIFAR-10 .npz: [n, 32, 32, 3])
    rather than C x H x W (CIFAR-10's own files)."""
    shape = tuple(int(d) for d in example_shape)
    return len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4)


def image_shape(example_shape) -> tuple[int, int, int]:
    """(channels, height, width) of one example of x as served: MNIST's 784
    values (or 28x28) are 1x28x28, 3072 values 3x32x32 (channels first,
    CIFAR-10's own order), H x W x C images C x H x W (see channels_last)."""
    shape = tuple(int(d) for d in example_shape)
    if channels_last(shape):
        return (shape[2], shape[0], shape[1])
    if shape in ((784,), (28, 28)):
        return (1, 28, 28)
    if shape == (3072,):
        return (3, 32, 32)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    raise SystemExit(f"x has examples of shape {list(shape)}: this trainer takes images (784, 3072, HxW or CxHxW "
                     "values)")


def make_model(shape: tuple[int, int, int], last: bool = False) -> nn.Module:
    """LeNet-5 for MNIST's 1x28x28 (the tutorial), the small CNN otherwise
    (`last`: examples arrive H x W x C)."""
    return LeNet5() if shape == (1, 28, 28) and not last else SmallCNN(shape, channels_last=last)


class SmallCNN(nn.Module):
    """A small CNN for CIFAR-10-like images (C x H x W, H and W multiples of
    4): two 3x3 convolutions (32, 64 channels, ReLU, max-pool 2), fully
    connected 256, ReLU, 10 classes. PyTorch's default initialisation."""

    def __init__(self, shape=(3, 32, 32), classes=10, channels_last=False):
        super().__init__()
        c, h, w = shape
        self.shape = shape
        self.channels_last = channels_last
        self.conv1 = nn.Conv2d(c, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (h // 4) * (w // 4), 256)
        self.out = nn.Linear(256, classes)

    def forward(self, x):
        c, h, w = self.shape
        x = x.reshape(-1, h, w, c).permute(0, 3, 1, 2) if self.channels_last else x.reshape(-1, c, h, w)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc(x.flatten(1)))
        return self.out(x)


class LeNet5(nn.Module):
    """convolutional_mlp.py's network (nkerns = 20, 50)."""

    def __init__(self, nkerns=(20, 50), hidden=500, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, nkerns[0], 5)
        self.conv2 = nn.Conv2d(nkerns[0], nkerns[1], 5)
        self.fc = nn.Linear(nkerns[1] * 4 * 4, hidden)
        self.out = nn.Linear(hidden, classes)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                fan_in = conv.in_channels * 25
                fan_out = conv.out_channels * 25 / 4  # over the 2x2 pooling
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                conv.weight.uniform_(-bound, bound)
                conv.bias.zero_()
            bound = math.sqrt(6.0 / (self.fc.in_features + self.fc.out_features))
            self.fc.weight.uniform_(-bound, bound)
            self.fc.bias.zero_()
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, x):
        x = x.reshape(-1, 1, 28, 28)
        x = torch.tanh(F.max_pool2d(self.conv1(x), 2))
        x = torch.tanh(F.max_pool2d(self.conv2(x), 2))
        x = torch.tanh(self.fc(x.flatten(1)))
        return self.out(x)  # logits; softmax is in the loss


class LocalDataset(IterableDataset):
    """The same minibatches (the documented order, sharded the same way)
    cut here from tensors loaded with pickle: torchvision-style local data."""

    def __init__(self, path, set, batch_size, *, shuffle=False, seed=0, drop_last=False):
        with gzip.open(path, "rb") as f:
            sets = dict(zip(SETS, pickle.load(f, encoding="latin1")))
        x, y = sets[set]
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0
        self.example_shape = tuple(self.x.shape[1:])

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return minibatch_client.num_batches(len(self.y), self.batch_size, world_size=dist_rank_world()[1],
                                            drop_last=self.drop_last)

    def __iter__(self):
        rank, world = dist_rank_world()
        order = torch.from_numpy(minibatch_client.epoch_order(len(self.y), shuffle=self.shuffle, seed=self.seed,
                                                              epoch=self.epoch, rank=rank, world_size=world))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)


def errors(model, loader) -> tuple[int, int]:
    """(misclassified, examples) over this rank's shard."""
    wrong = seen = 0
    with torch.no_grad():
        for x, y in loader:
            wrong += int((model(x).argmax(1) != y).sum())
            seen += len(y)
    return wrong, seen


def all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def save_checkpoint(path: str, model, opt, data_state: dict, step: int) -> None:
    """Rank 0 writes; every rank waits for the file."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = f"{path}.tmp"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "data": data_state, "step": step},
                   tmp)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", help="minibatchd address(es): host:port, comma-separated replicas, or "
                                      "unix:///path.sock (attach: same host)")
    src.add_argument("--data-file", metavar="PATH", help="train on mnist.pkl.gz-style arrays loaded here")
    ap.add_argument("--dataset", default="", help="which of the daemon's datasets (serve --data NAME=PATH; "
                                                  "default: its only one)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=500, help="examples per minibatch per rank (tutorial: 500)")
    ap.add_argument("--learning-rate", type=float, default=0.1)
    ap.add_argument("--shuffle", action="store_true", help="the server's shuffled order, reshuffled every epoch")
    ap.add_argument("--seed", type=int, default=0, help="model initialisation and shuffling")
    ap.add_argument("--x-dtype", choices=["float32", "uint8", "float16", "bfloat16"],
                    help="wire dtype of x (decoded to the exact float32 here)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    ap.add_argument("--token", default=os.environ.get("MINIBATCHD_TOKEN"), help="bearer token (env MINIBATCHD_TOKEN)")
    ap.add_argument("--checkpoint", metavar="PATH", help="write checkpoints here")
    ap.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="also every N steps")
    ap.add_argument("--resume", metavar="PATH", help="continue from this checkpoint")
    ap.add_argument("--stop-after", type=int, default=0, metavar="N",
                    help="stop after step N (counted from the start of training), checkpointing first")
    ap.add_argument("--deterministic", action="store_true",
                    help="deterministic algorithms, one intra-op thread: bit-reproducible on CPU")
    ap.add_argument("--save", metavar="PT", help="write the final model's state_dict here")
    ap.add_argument("--json", metavar="PATH", help="write per-epoch metrics here (rank 0)")
    a = ap.parse_args(argv)
    if a.data_file and (a.checkpoint or a.resume):
        ap.error("checkpoints need --server (the dataset state is MinibatchDataset's)")

    torch.manual_seed(a.seed)
    if a.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    rank, world = dist_rank_world()
    log = print if rank == 0 else (lambda *_: None)

    def dataset(name, shuffle):
        kw = dict(shuffle=shuffle, seed=a.seed, drop_last=False)
        if a.data_file:
            return LocalDataset(a.data_file, name, a.batch_size, **kw)
        return MinibatchDataset(a.server.split(",") if "," in a.server else a.server, name, a.batch_size,
                                x_dtype=a.x_dtype, token=a.token, dataset=a.dataset, **kw)

    train_ds = dataset("train", a.shuffle)
    # forkserver workers: grpcio is not fork-safe (minibatch_client.torch.worker_context)
    ctx = worker_context() if a.workers else None
    loaders = {name: DataLoader(ds, batch_size=None, num_workers=a.workers, multiprocessing_context=ctx)
               for name, ds in [("train", train_ds), ("valid", dataset("valid", False)),
                                ("test", dataset("test", False))]}
    shape = image_shape(train_ds.example_shape)
    model = make_model(shape, channels_last(train_ds.example_shape))
    # Wait accounting (minibatch_client.stats): the dataset times next() on
    # its DataLoader in this process, what the trainer waits on with any
    # number of workers; local tensors get a bare meter, the same code.
    if isinstance(train_ds, MinibatchDataset):
        timed, stats = train_ds.timed, train_ds.stats
    else:
        meter = WaitMeter()
        timed, stats = (lambda loader: meter.iterate(loader, nbytes)), meter.snapshot
    opt = torch.optim.SGD(model.parameters(), lr=a.learning_rate)
    step = 0
    if a.resume:
        ck = torch.load(a.resume, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        train_ds.load_state_dict(ck["data"])
        step = ck["step"]
        d = ck["data"]
        log(f"... resumed from {a.resume}: step {step}, epoch {d['epoch']}, minibatch {d['position']} of world "
            f"size {d['world_size']} (offset {d['offset']}), now {world} rank(s): {len(train_ds)} minibatches "
            "left in the epoch")
    first_epoch = train_ds.epoch if a.resume else 0
    ddp = nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    src = f"{a.data_file} (local tensors)" if a.data_file else a.server
    name = "LeNet-5" if isinstance(model, LeNet5) else "small CNN"
    last = " (channels last)" if channels_last(train_ds.example_shape) else ""
    log(f"... {name} on {'x'.join(map(str, shape))} images{last}, {world} rank(s), minibatches of {a.batch_size} per rank "
        f"from {src}, "
        f"{len(train_ds)} steps in the first epoch")
    history = []
    for epoch in range(first_epoch, a.epochs):
        train_ds.set_epoch(epoch)
        consumed = 0
        cost = 0.0
        stats(reset=True)  # this epoch's figures: not the evaluation between epochs
        t_epoch = time.perf_counter()
        for x, y in timed(loaders["train"]):
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            cost += loss.item()
            consumed += 1
            step += 1
            stop = a.stop_after and step >= a.stop_after
            if a.checkpoint and (stop or (a.checkpoint_every and step % a.checkpoint_every == 0)):
                # consumed= counts the trainer's own steps of this pass: right
                # with DataLoader workers too (they run ahead of the trainer).
                save_checkpoint(a.checkpoint, model, opt, train_ds.state_dict(consumed=consumed), step)
            if stop:
                log(f"... stopped after step {step} (epoch {epoch}, {consumed} minibatches into this pass)")
                if a.save and rank == 0:
                    torch.save(model.state_dict(), a.save)
                finish()
                return 0
        seconds = time.perf_counter() - t_epoch
        waited = stats(reset=True)
        if a.checkpoint:
            save_checkpoint(a.checkpoint, model, opt, train_ds.state_dict(consumed=consumed), step)
        model.eval()
        (vw, vn, tw, tn, w_sum, b_sum, steps) = all_sum(
            [*errors(model, loaders["valid"]), *errors(model, loaders["test"]), waited.wait_seconds,
             waited.wait_seconds + waited.busy_seconds, consumed])
        model.train()
        row = {"epoch": epoch, "steps": consumed, "cost": cost / max(consumed, 1), "valid_error": vw / vn,
               "test_error": tw / tn, "seconds": seconds, "wait_fraction": w_sum / b_sum if b_sum else 0.0,
               "wait_p50": waited.wait_p50, "wait_p99": waited.wait_p99, "minibatch_bytes": waited.bytes}
        history.append(row)
        log(f"epoch {epoch}: {consumed} steps, cost {row['cost']:.4f}, validation error "
            f"{100 * row['valid_error']:.2f} %, test error {100 * row['test_error']:.2f} %, {seconds:.2f} s, "
            f"waiting for data: {100 * row['wait_fraction']:.1f} % of step time")
    if rank == 0:
        if a.save:
            torch.save(model.state_dict(), a.save)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"world_size": world, "batch_size": a.batch_size, "source": src, "epochs": history}, f,
                          indent=1)
    finish()
    return 0


def finish() -> None:
    """Leaves the process group together: a rank that tears gloo down while
    another is still writing its files can abort the other ("terminate
    called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
