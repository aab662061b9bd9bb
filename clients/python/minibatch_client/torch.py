"""PyTorch: minibatchd as an IterableDataset, with exact, elastic resumption.

    from minibatch_client.torch import MinibatchDataset
    ds = MinibatchDataset("127.0.0.1:50051", "train", 500, shuffle=True, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None)   # the server batches
    for epoch in range(start_epoch, epochs):
        ds.set_epoch(epoch)
        for x, y in ds.timed(loader):      # x float32 [500, *example shape], y int64 [500] torch tensors
            ...
        print(ds.stats(reset=True).wait_fraction)   # the share of the epoch spent waiting for data
    ckpt["data"] = ds.state_dict()          # with num_workers=k: ds.state_dict(consumed=steps)
    ...
    ds.load_state_dict(ckpt["data"])        # same epoch, next minibatch; any world size

Only this module imports torch (the extra `minibatch-client[torch]`).

Order. Each rank gets the documented order (README "Order") of its shard:
rank and world size come from the constructor, else from torch.distributed
when it is initialized, else from the RANK / WORLD_SIZE environment
variables (torchrun sets them), else 0 / 1. Every rank gets the same number
of minibatches (the order rule cuts the epoch to a multiple of the world
size), so DDP's collectives never wait on a rank that ran out.

DataLoader workers. With `DataLoader(ds, batch_size=None, num_workers=k)`,
worker j fetches the rank's minibatches p+j, p+j+k, ... (p: where the pass
starts) and the DataLoader hands them to the trainer round-robin, i.e. in
order, each exactly once. Over TCP, pass
`multiprocessing_context=worker_context()` (forkserver): grpcio is not
fork-safe, and a worker forked from a process with gRPC threads can hang
(a forked worker warns when this module used gRPC in its parent).
Attaching (unix://) uses no gRPC and works with the default fork as well.

State. `state_dict()` names the dataset (its fingerprint), the set, batch
size, shuffle, seed, drop_last, epoch, world size, `offset` (positions of
the epoch's order consumed before the current world size took over: 0
unless the world size changed mid-epoch) and `position` (minibatches of this
epoch the rank has consumed since `offset`). The dataset counts the
minibatches it yielded in the process that iterates it, which is the
trainer's process with num_workers=0 (also inside torchdata's
StatefulDataLoader, which saves and restores it; StatefulDataLoader with
workers would save each worker's part, and is refused). With num_workers > 0 the iterating processes are the
workers, which run ahead of the trainer; the dataset in the trainer's
process cannot see what was consumed, so the trainer passes it:
`ds.state_dict(consumed=k)`, k = minibatches taken from the loader in the
current pass (state_dict() called in a worker raises; without `consumed`
in the trainer's process it would count 0, as that process yielded none).
With workers, call set_epoch(e) before each epoch, as with
DistributedSampler: the trainer's copy of the dataset does not see a pass
end.

`load_state_dict()` refuses (ValueError, naming both values) a state of
another dataset, set, batch size, shuffle, seed or drop_last. The next pass
starts at the saved position. With another world size it continues the same
epoch: the consumed positions are exactly the first offset + position *
batch_size * world_size of the epoch's order (every rank consumed `position`
full minibatches), which becomes the new offset; the rest is re-strided over
the new world size, which leaves out at most new_world_size - 1 positions at
its end (and, with drop_last, each rank's final partial minibatch). A state
saved at the end of an epoch resumes with nothing left in it; `set_epoch(e +
1)` then starts the next epoch at offset 0.

Wait accounting (stats.py). What a trainer waits on is `next()` on its
DataLoader, in its own process: `ds.timed(loader)` iterates the loader
timing exactly that, and `ds.stats()` reports it (minibatches, bytes,
seconds waiting and between steps, wait_fraction, p50/p99). That is the
honest figure with any num_workers: with workers, the dataset's own
iteration runs in the worker processes, each with its own copy of the
dataset and so its own stats, which the trainer never sees; the workers'
prefetching (DataLoader's prefetch_factor) then hides their waits, and only
what is left of them shows at the loader. Iterated without timed() (the
dataset directly, or a DataLoader with num_workers=0), the dataset times
its own next() in the process iterating it, which then is the trainer's
(the same figure but for the DataLoader's own few microseconds). Over TCP
without workers the epoch stream's prefetch queue is watched too
(prefetch_depth, prefetch_ready_mean, prefetch_empty).
"""
from __future__ import annotations

import os
import socket
import warnings
from types import SimpleNamespace
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from . import attach as _attach
from . import order as _order
from . import stats as _stats
from .attach import socket_path
from .client import Client
from .dtypes import decode_x, dtype_code, dtype_name

#: state_dict()["format"]: what kind of state this is, and its version
STATE_FORMAT = "minibatchd.MinibatchDataset/1"

# Keys that must match for a state to load: it describes another order otherwise.
_IDENTITY = ("fingerprint", "set", "batch_size", "shuffle", "seed", "drop_last")


# The process in which this module last made a gRPC client (None: none yet).
_GRPC_PID: Optional[int] = None


def worker_context(preload: Sequence[str] = ("numpy", "grpc", "torch")):
    """The multiprocessing context for DataLoader workers of a dataset served
    over TCP: `DataLoader(ds, batch_size=None, num_workers=k,
    multiprocessing_context=worker_context())`.

    grpcio is not fork-safe: a worker forked while the trainer's process has
    gRPC threads (a live channel, or one closed a few milliseconds before)
    can deadlock in its first gRPC call. "forkserver" forks workers from a
    clean server process instead; `preload` is imported there once (when
    the server starts, i.e. if no forkserver ran before), so that a worker
    starts in about a tenth of a second (importing grpc starts no thread).
    Python 3.11's forkserver imports `preload` from the default sys.path,
    not the trainer's, so this package is left to the workers, which see the
    trainer's sys.path. The trainer's script needs the usual `if __name__ ==
    "__main__":` guard. Attached datasets (unix://) use no gRPC and are safe
    with the default fork too."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size): torch.distributed's when initialized, else the
    RANK / WORLD_SIZE environment variables, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is not None and world is not None:
        return int(rank), int(world)
    return 0, 1


def _nb(n: int, size: int, world: int, drop_last: bool, offset: int) -> int:
    """Minibatches per rank of (n, size, world, drop_last) from `offset`
    (0 when fewer than `world` positions are left)."""
    return _order.num_batches(n, size, world_size=world, drop_last=drop_last, offset=offset)


class MinibatchDataset(IterableDataset):
    """One set of a minibatchd dataset as a torch IterableDataset of
    minibatches: yields (x, y) tensors of `batch_size` examples (the last
    one smaller unless drop_last) in the documented order. Use it with
    `DataLoader(ds, batch_size=None)` (the server batches), or iterate it
    directly.

    address:     "host:port", a list of them (replicas: an epoch fails over
                 to the next, each minibatch exactly once), or
                 "unix:///path/to.sock": the daemon's Unix socket on this
                 host, where the dataset ATTACHES (Client.attach(): the
                 daemon's memory mapped, no network, no copy but the gather).
    dataset:     which of the daemon's datasets (its name, `serve --data
                 NAME=PATH`; "" = the daemon's only one).
    set, batch_size, shuffle, seed, drop_last: the order (README "Order").
    x_dtype:     the wire dtype of x (None: as stored; "uint8" carries a
                 quarter of float32's bytes). decode=True (default) turns
                 it into float32 exactly (uint8 bytes / scale_divisor);
                 decode=False yields it as is (bfloat16 as torch.bfloat16).
    y_dtype:     None (as stored, int64 for MNIST) or "int32" (TCP only).
    device:      move each minibatch there (e.g. "cuda"); pin_memory=True
                 copies it into pinned memory first and moves it with
                 non_blocking=True (overlapping the copy with compute).
                 Without device, pin_memory only pins (as DataLoader's).
                 Inside DataLoader workers, leave device unset and use the
                 DataLoader's pin_memory=True instead (CUDA does not work
                 in forked workers).
    device_attach: with a unix:// address, read the daemon's copy in this
                 GPU's memory (`serve --device`; "cuda:0" or a GPU UUID):
                 minibatches are then device tensors made there, a slice or
                 an on-device gather of the resident copy, with no host
                 copy and no host-to-device transfer (README "Device
                 memory"). Not inside DataLoader workers; x and y as stored.
    rank, world_size: override torch.distributed / RANK, WORLD_SIZE.
    epoch:       the first epoch (set_epoch changes it).
    prefetch:    minibatches the TCP stream keeps ready (Client.epoch).
    token:       the daemon's bearer token.
    stats:       wait accounting (stats(), timed()); None: on unless
                 MINIBATCH_CLIENT_STATS=0.
    client_options: more keyword arguments for Client (timeout, tls_ca, native, ...).

    Minibatches arrive as fresh numpy arrays, which become tensors without
    a copy (torch.from_numpy).
    """

    def __init__(self, address: Union[str, Sequence[str]], set: str = "train", batch_size: int = 500, *,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False, x_dtype=None, y_dtype=None,
                 decode: bool = True, device: Union[None, str, torch.device] = None, pin_memory: bool = False,
                 rank: Optional[int] = None, world_size: Optional[int] = None, epoch: int = 0, prefetch: int = 2,
                 token: Optional[str] = None, stats: Optional[bool] = None, dataset: str = "",
                 device_attach=None, **client_options: Any):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if (rank is None) != (world_size is None):
            raise ValueError("give rank and world_size together (or neither: from torch.distributed / env)")
        self.address = address
        self.dataset = str(dataset)
        self.set = set
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.x_dtype = dtype_name(dtype_code(x_dtype)) if dtype_code(x_dtype) else None
        self.y_dtype = dtype_name(dtype_code(y_dtype)) if dtype_code(y_dtype) else None
        self.decode = bool(decode)
        self.device = torch.device(device) if device is not None else None
        self.pin_memory = bool(pin_memory)
        self.prefetch = int(prefetch)
        self.token = token
        self.client_options = dict(client_options)
        self._rank_world = (int(rank), int(world_size)) if rank is not None else None
        self._attach = isinstance(address, str) and socket_path(address) is not None
        self.device_attach = device_attach
        if device_attach is not None and (not self._attach or self.x_dtype or self.y_dtype):
            raise ValueError(f"device_attach={device_attach!r} reads the daemon's device copy over its Unix socket "
                             "(address unix:///PATH), with x and y as stored (no x_dtype / y_dtype)")
        if self._attach and self.y_dtype is not None:
            raise ValueError(f"y_dtype={self.y_dtype!r} with {address}: an attached daemon shares y as stored "
                             "(convert the tensor instead, e.g. y.int())")
        # (fingerprint, examples of the set), read once, with x's shape of one example
        self._meta: Optional[tuple[str, int]] = None
        self._x_shape: Optional[tuple[int, ...]] = None
        # the connection of the process that made it: (pid, Client or Attachment)
        self._conn: Optional[tuple[int, Any]] = None
        # Where the next pass starts: epoch, offset of the epoch's order,
        # minibatch `start` of the rank's order from there.
        self.epoch = int(epoch)
        self._offset = 0
        self._start = 0
        # the pass now running or last run in this process
        self._yielded = 0        # minibatches it yielded
        self._finished = False   # it yielded every minibatch
        self._resumed = False    # the start point came from load_state_dict and no pass used it yet
        self._warned_pin = False
        #: every switch of this process's epoch streams to another server (Client.epoch's Failover records)
        self.failovers: list = []
        # Wait accounting: one meter per process (see __getstate__), the
        # stream whose prefetch queue it watches, and how many timed()
        # loops are running over this dataset in this process (then they
        # time, and the dataset's own iteration does not count twice).
        self._stats_on = _stats.enabled_by_default() if stats is None else bool(stats)
        self._meter = _stats.meter(self._stats_on)
        self._meter_pid = os.getpid()
        self._stream: Any = None
        self._timed = 0

    # -- rank, world, metadata, connection --

    def rank_world(self) -> tuple[int, int]:
        """(rank, world size) this dataset shards by."""
        rw = self._rank_world if self._rank_world is not None else dist_rank_world()
        r, w = rw
        if not 0 <= r < max(w, 1):
            raise ValueError(f"rank {r} is not below world size {w}")
        return r, max(w, 1)

    def __getstate__(self):
        # Pickled for DataLoader workers (spawn) in the trainer's process,
        # where torch.distributed knows the rank; a worker may not.
        state = dict(self.__dict__)
        state["_rank_world"] = self.rank_world()
        state["_conn"] = None
        # A worker counts for itself (a lock does not pickle anyway).
        del state["_meter"]
        state["_stream"] = None
        state["_timed"] = 0
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._meter = _stats.meter(self._stats_on)
        self._meter_pid = os.getpid()

    # -- wait accounting --

    def _own_meter(self) -> "_stats.WaitMeter":
        """This process's meter: a forked worker inherits its parent's
        counts, and starts afresh instead."""
        pid = os.getpid()
        if self._meter_pid != pid:
            self._meter = _stats.meter(self._stats_on)
            self._meter_pid = pid
            self._timed = 0
            self._stream = None
        return self._meter

    def stats(self, reset: bool = False) -> "_stats.WaitStats":
        """What the trainer waited for this dataset's minibatches, measured
        in this process (see the module's docstring: iterate
        `ds.timed(loader)` for the DataLoader's boundary, which is what the
        trainer waits on with any number of workers). reset=True starts a new
        period, e.g. at each epoch."""
        return self._own_meter().snapshot(reset)

    def reset_stats(self) -> None:
        """Starts the wait accounting afresh (stats())."""
        self._own_meter().reset()

    def timed(self, loader) -> Iterator:
        """Iterates `loader` (a DataLoader over this dataset, or any
        iterable of (x, y) minibatches), timing each next() in this process
        into stats(): the time the trainer is blocked waiting for data, and
        the time between (its step). While it runs, the dataset's own
        iteration in this process (num_workers=0) does not count again."""
        meter = self._own_meter()
        self._timed += 1
        try:
            yield from meter.iterate(loader, _stats.nbytes, ready=self._ready)
        finally:
            self._timed -= 1

    def _ready(self) -> Optional[int]:
        """Minibatches the running TCP epoch stream of this process holds
        ready (None: no such stream, e.g. attached or in workers)."""
        it = self._stream
        return it.ready if it is not None else None

    def _attach_now(self, x_dtype=None):
        # No gRPC at all (attach.connect, not Client.attach): forked workers are safe.
        return _attach.connect(self.address, token=self.token, x_dtype=x_dtype,
                               timeout=self.client_options.get("timeout", 60.0), dataset=self.dataset,
                               device=self.device_attach)

    def _client(self) -> Client:
        global _GRPC_PID
        _GRPC_PID = os.getpid()
        opts = dict(self.client_options)
        if "trainer_id" not in opts:
            r, w = self.rank_world()
            opts["trainer_id"] = f"{socket.gethostname()} pid {os.getpid()} rank {r}/{w}"
        return Client(self.address, token=self.token, dataset=self.dataset, **opts)

    def _connection(self):
        pid = os.getpid()
        if self._conn is None or self._conn[0] != pid:
            # A connection from another process (before a fork) is left alone.
            self._conn = (pid, self._attach_now(self.x_dtype) if self._attach else self._client())
        return self._conn[1]

    def _fetch_meta(self) -> tuple[str, int]:
        if self._meta is None:
            if self._conn is not None and self._conn[0] == os.getpid():
                self._meta = self._describe(self._conn[1])
            elif self._attach:
                with self._attach_now() as a:
                    self._meta = self._describe(a)
            else:
                # A short-lived client: the trainer's process may start
                # DataLoader workers later, which make their own.
                with self._client() as c:
                    self._meta = self._describe(c)
        return self._meta

    def _describe(self, conn) -> tuple[str, int]:
        if isinstance(conn, Client):
            info = conn.info()
            sets, fp = info.sets, info.fingerprint
        else:
            sets, fp = conn.sets, conn.fingerprint
        if self.set not in sets:
            raise KeyError(f"the dataset at {self.address} has no set {self.set!r}; it has {', '.join(sets)}")
        x = sets[self.set].x
        # GetInfo's TensorInfo.shape is one example's; an attached Region's is the whole tensor's
        self._x_shape = tuple(x.shape) if isinstance(conn, Client) else tuple(x.shape[1:])
        return fp, sets[self.set].examples

    @property
    def fingerprint(self) -> str:
        """The dataset's fingerprint (GetInfo's, or the attachment's)."""
        return self._fetch_meta()[0]

    @property
    def example_shape(self) -> tuple[int, ...]:
        """The shape of one example of x as the daemon serves it, e.g. (784,)
        for MNIST, (3, 32, 32) or (3072,) for CIFAR-10 (whichever the daemon
        keeps): x minibatches are (rows, *example_shape)."""
        if getattr(self, "_x_shape", None) is None:
            self._meta = None
            self._fetch_meta()
        return self._x_shape

    @property
    def examples(self) -> int:
        """Examples in the set."""
        return self._fetch_meta()[1]

    def close(self) -> None:
        """Closes this process's connection (a new pass reconnects)."""
        conn, self._conn = self._conn, None
        if conn is not None and conn[0] == os.getpid():
            conn[1].close()

    # -- epochs and lengths --

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass iterates (as DistributedSampler.set_epoch):
        it starts at its beginning, unless it is the epoch a loaded state
        left off in and no pass has run since (then it resumes there)."""
        epoch = int(epoch)
        if epoch == self.epoch and self._resumed:
            return
        self.epoch = epoch
        self._offset = self._start = 0
        self._finished = False
        self._resumed = False
        self._yielded = 0

    def num_batches(self, *, world_size: Optional[int] = None, offset: int = 0) -> int:
        """Minibatches per rank in a whole epoch (from `offset`)."""
        w = self.rank_world()[1] if world_size is None else int(world_size)
        return _nb(self.examples, self.batch_size, w, self.drop_last, offset)

    def _next_pass(self) -> tuple[int, int, int]:
        """(epoch, offset, start) of the pass __iter__ would begin now."""
        if self._finished:  # the last pass ran to the end: the next one repeats the epoch from its start
            return self.epoch, 0, 0
        return self.epoch, self._offset, self._start

    def __len__(self) -> int:
        """Minibatches this rank gets in the pass that iterating begins (or
        is running): a whole epoch's, or what is left of it after a resume.
        The same on every rank."""
        _, offset, start = self._next_pass()
        return max(self.num_batches(offset=offset) - start, 0)

    # -- iteration --

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = self.rank_world()
        worker = get_worker_info()
        k, j = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        if worker is not None and self.device is not None and self.device.type != "cpu":
            raise ValueError(f"MinibatchDataset(device={self.device}) inside a DataLoader worker: leave device "
                             "unset there, and use DataLoader(pin_memory=True) and .to(device) in the trainer")
        if worker is not None and self.device_attach is not None:
            raise ValueError(f"MinibatchDataset(device_attach={self.device_attach!r}) inside a DataLoader worker: "
                             "device minibatches are already where the trainer needs them; use num_workers=0")
        if worker is not None and not self._attach and _GRPC_PID is not None and _GRPC_PID != os.getpid():
            warnings.warn(
                f"MinibatchDataset: DataLoader worker {worker.id} was forked from a process that used gRPC "
                f"(pid {_GRPC_PID}); grpcio is not fork-safe and the worker may hang. Pass "
                "multiprocessing_context=minibatch_client.torch.worker_context() to the DataLoader", stacklevel=2)
        epoch, offset, start = self._next_pass()
        self.epoch, self._offset, self._start = epoch, offset, start
        self._finished = self._resumed = False
        self._yielded = 0
        n = self.examples
        nb = _nb(n, self.batch_size, world, self.drop_last, offset)
        return self._iterate(rank, world, epoch, offset, start, nb, k, j)

    def _iterate(self, rank, world, epoch, offset, start, nb, k, j):
        mine = range(start + j, nb, k)
        if len(mine):
            tensors = ((self._tensor(x), self._tensor(y))
                       for x, y in self._batches(rank, world, epoch, offset, mine, k))
            meter = self._own_meter()
            if not self._timed:  # timed() is timing this very iteration from outside
                tensors = meter.iterate(tensors, _stats.nbytes, ready=self._ready)
            for t in tensors:
                self._yielded += 1
                yield t
        self._finished = True

    def _order_kw(self, rank, world, epoch, offset) -> dict:
        return dict(shuffle=self.shuffle, seed=self.seed, epoch=epoch, rank=rank, world_size=world,
                    drop_last=self.drop_last, offset=offset)

    def _batches(self, rank, world, epoch, offset, mine: range, k: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        conn = self._connection()
        kw = self._order_kw(rank, world, epoch, offset)
        if not self._attach:
            if k == 1:  # one prefetched, failing-over stream
                with conn.epoch(self.set, self.batch_size, start=mine.start, x_dtype=self.x_dtype,
                                y_dtype=self.y_dtype, decode=self.decode, prefetch=self.prefetch, **kw) as it:
                    self._stream = it
                    if self.prefetch:
                        self._own_meter().prefetching(self.prefetch)
                    try:
                        yield from it
                    finally:
                        self._stream = None
                        self.failovers.extend(it.failovers)
            else:  # every k-th minibatch: one GetBatch each (failing over too)
                for i in mine:
                    yield conn.get_batch(self.set, i, self.batch_size, x_dtype=self.x_dtype, y_dtype=self.y_dtype,
                                         decode=self.decode, **kw)
            return
        if k == 1:
            yield from conn.epoch(self.set, self.batch_size, start=mine.start, decode=self.decode, **kw)
            return
        # Workers: the rank's order once, every k-th minibatch gathered from
        # the mapping into fresh arrays (the bytes Attachment.epoch gathers).
        s = conn.sets[self.set]
        xs, ys = conn.arrays(self.set)
        order = _order.epoch_order(s.examples, **{a: kw[a] for a in kw if a != "drop_last"})
        for i in mine:
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = xs.take(idx, axis=0)
            if self.decode:
                x = decode_x(SimpleNamespace(array=x, dtype=s.x.dtype, scale_divisor=s.x.scale_divisor))
            yield x, ys.take(idx, axis=0)

    def _tensor(self, a) -> torch.Tensor:
        if isinstance(a, torch.Tensor):  # from the daemon's device copy (device_attach)
            return a if self.device is None else a.to(self.device)
        if a.dtype == np.uint16 and self.x_dtype == "bfloat16" and not self.decode and a.ndim > 1:
            t = torch.from_numpy(a).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
        pin = self.pin_memory
        if pin and not torch.cuda.is_available():
            if not self._warned_pin:
                warnings.warn("MinibatchDataset(pin_memory=True) but no CUDA device: not pinning", stacklevel=3)
                self._warned_pin = True
            pin = False
        if pin:
            t = t.pin_memory()
        if self.device is not None:
            t = t.to(self.device, non_blocking=pin)
        return t

    # -- state --

    def state_dict(self, consumed: Optional[int] = None) -> dict:
        """Where this rank is in the epoch (see the module's docstring).

        consumed: minibatches the trainer took in the current pass, when a
        DataLoader with workers sits in between (this process then did not
        iterate and cannot count). None: what this process yielded."""
        if get_worker_info() is not None:
            raise RuntimeError(
                "MinibatchDataset.state_dict() in a DataLoader worker: workers run ahead of the trainer and each "
                "sees only its own minibatches; call ds.state_dict(consumed=k) in the trainer's process instead, "
                "k = minibatches taken from the loader in this pass")
        _, w = self.rank_world()
        fp, n = self._fetch_meta()
        if consumed is None:
            done = self._yielded
        else:
            done = int(consumed)
            if done < 0:
                raise ValueError(f"consumed must not be negative, not {done}")
        nb = _nb(n, self.batch_size, w, self.drop_last, self._offset)
        position = self._start + done
        if position > nb:
            raise ValueError(f"consumed={done} from minibatch {self._start} is past the end of the epoch: "
                             f"{nb} minibatches per rank")
        return {
            "format": STATE_FORMAT,
            "fingerprint": fp,
            "set": self.set,
            "examples": n,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "epoch": self.epoch,
            "world_size": w,
            "offset": self._offset,
            "position": position,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume where `state` left off: the next pass starts at its
        position (its epoch; re-strided when the world size differs)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a MinibatchDataset state (format {got!r}, expected {STATE_FORMAT!r})")
        fp, n = self._fetch_meta()
        mine = {"fingerprint": fp, "set": self.set, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "seed": self.seed, "drop_last": self.drop_last}
        for key in _IDENTITY:
            if state[key] != mine[key]:
                what = "dataset (fingerprint)" if key == "fingerprint" else key
                raise ValueError(f"this state is of another {what}: it has {key}={state[key]!r}, this dataset has "
                                 f"{key}={mine[key]!r}; resuming would train on other minibatches than the "
                                 "checkpoint's run")
        epoch, w, offset, position = (int(state[k]) for k in ("epoch", "world_size", "offset", "position"))
        if not (0 <= offset <= n and 1 <= w <= n):
            raise ValueError(f"state out of range: offset {offset}, world size {w} for a set of {n} examples")
        nb = _nb(n, self.batch_size, w, self.drop_last, offset)
        if not 0 <= position <= nb:
            raise ValueError(f"state out of range: position {position} with {nb} minibatches per rank of world "
                             f"size {w} from offset {offset}")
        _, w2 = self.rank_world()
        if w2 != w:
            if position == nb:  # the epoch is complete: nothing left under any world size
                offset, position = n, 0
            else:  # `position` full minibatches on each of w ranks: a prefix of the order
                offset, position = _order.resume_offset(offset, position, self.batch_size, w), 0
        self.epoch, self._offset, self._start = epoch, offset, position
        self._yielded = 0
        self._finished = False
        self._resumed = True
