"""What one GetBatch or StreamBatches call may receive, worked out before the
call starts: which minibatches, in which order, and for each tensor its
dtype and exact shape, hence its size in bytes.

Why: every chunk declares its tensor's shape and `total_bytes`, and the
grpcio transport allocates the tensor whole when its first chunk arrives
(one copy per byte). Trusting those numbers let a broken or hostile server
make a client allocate 2**40 bytes (numpy's MemoryError, outside the
client's errors) or stream to it without end. So no number a server sends
is used before it is checked against what the client already knows:

- the request: the set, the minibatch size, the order (shard and
  drop_last), the wire dtypes asked for, whether indices were asked for,
  and for StreamBatches `start` and `count`;
- the server's GetInfo, read once per server before its first minibatch
  (Client._described): the examples in the set, the shape of one example
  and the stored dtype of x and y;
- the order arithmetic the server uses (order.py): minibatch i of size s
  holds min(s, shard - i*s) examples, and the order has num_batches of them.

Anything else (another minibatch index, one minibatch more than asked for,
a tensor not asked for, another dtype or shape, total_bytes that is not
shape x item size, the stream ending early) is a ProtocolError. Both
transports check here: grpcio's chunks go through wire.Assembler, which asks
at the first chunk of each minibatch and tensor, before allocating; the
native transport reassembles in Rust and hands each whole minibatch here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Optional, Sequence, Union

import numpy as np

from . import order
from ._proto import minibatch_pb2 as pb
from .dtypes import DTYPE_NAMES, DTYPES, dtype_name
from .errors import ProtocolError
from .info import DatasetInfo

Request = Union[pb.GetBatchRequest, pb.StreamBatchesRequest]


@dataclass(frozen=True)
class _Tensor:
    #: the proto Dtype the request implies: the one asked for, else the stored one
    dtype: int
    #: shape of one example (GetInfo); the tensor is (rows, *example)
    example: tuple[int, ...]


class Expected:
    """The minibatches one call may send, checked as they arrive. One per
    call: it keeps count of the minibatches received."""

    def __init__(self, req: Request, info: DatasetInfo, first: int, count: Optional[int]):
        """Minibatches `first`, first+1, ... of `req`'s order: `count` of
        them, or (None) to the end of the order. A request the set cannot
        serve (unknown set, index past the end, invalid size or shard) expects
        none: the server answers it with an error status."""
        s = info.sets.get(req.set)
        o = req.order
        available, self._shard = 0, 0
        if s is not None:
            try:
                available = order.num_batches(s.examples, req.size, world_size=o.world_size,
                                              drop_last=o.drop_last) - first
            except ValueError:  # size 0, or more ranks than examples
                pass
            self._shard = order.shard_len(s.examples, world_size=o.world_size)
        available = max(available, 0)
        #: examples per minibatch; minibatch i has min(size, shard - i * size)
        self._size = req.size
        self._first = first
        #: the minibatch expected next, and the end of those asked for
        self.next = first
        self.end = first + (available if count is None else min(count, available))
        self._tensors: dict[str, _Tensor] = {}
        if s is not None:
            self._tensors["x"] = _Tensor(req.x_dtype or DTYPE_NAMES.get(s.x.dtype, 0), s.x.shape)
            self._tensors["y"] = _Tensor(req.y_dtype or DTYPE_NAMES.get(s.y.dtype, 0), s.y.shape)
            if req.with_indices:
                self._tensors["indices"] = _Tensor(pb.DTYPE_INT64, ())
        #: largest message the server said it sends (GetInfo limits; None: not said)
        self.max_message_bytes: Optional[int] = info.limits.max_message_bytes or None

    @classmethod
    def get_batch(cls, req: pb.GetBatchRequest, info: DatasetInfo) -> "Expected":
        """GetBatch: minibatch req.index, alone."""
        return cls(req, info, req.index, 1)

    @classmethod
    def stream_batches(cls, req: pb.StreamBatchesRequest, info: DatasetInfo) -> "Expected":
        """StreamBatches: minibatches req.start, ..., `count` of them or to the end."""
        return cls(req, info, req.start, req.count or None)

    def begin(self, index: int) -> None:
        """A minibatch starts: it must be the next one asked for."""
        if index == self.next < self.end:
            return
        if index == self.next:
            asked = self.end - self._first
            raise ProtocolError(f"minibatch {index} is one more than the {asked} asked for "
                                f"(minibatches {self._first} to {self.end - 1})" if asked else
                                f"minibatch {index} was sent for a request that has no minibatches")
        raise ProtocolError(f"expected minibatch {self.next}, got {index}")

    def tensor(self, name: str, dtype: int, shape: Sequence[int], total_bytes: int) -> np.dtype:
        """A tensor of the current minibatch starts: its declared dtype,
        shape and byte size must be what the request implies. Returns the
        numpy dtype its bytes are read as."""
        t = self._tensors.get(name)
        where = f"minibatch {self.next}, tensor {name!r}"
        if t is None:
            raise ProtocolError(f"{where} was not asked for (expected {', '.join(self._tensors)})")
        if dtype != t.dtype or dtype not in DTYPES:
            raise ProtocolError(f"{where}: dtype {dtype_name(dtype)} ({dtype}), the request implies "
                                f"{dtype_name(t.dtype)}")
        want = (min(self._size, self._shard - self.next * self._size), *t.example)
        if tuple(shape) != want:
            raise ProtocolError(f"{where}: shape {list(shape)}, the request implies {list(want)}")
        npd = DTYPES[dtype][1]
        nbytes = math.prod(want) * npd.itemsize
        if total_bytes != nbytes:
            raise ProtocolError(f"{where}: total_bytes {total_bytes}, but shape {list(want)} of "
                                f"{dtype_name(dtype)} is {nbytes} bytes")
        return npd

    def complete(self, names: Collection[str]) -> None:
        """The current minibatch's last chunk came: it must hold every tensor asked for."""
        if "x" not in names or "y" not in names:
            raise ProtocolError(f"minibatch {self.next} lacks x or y (got {sorted(names)})")
        if any(n not in names for n in self._tensors):
            raise ProtocolError(f"minibatch {self.next} came without the indices asked for")
        self.next += 1

    def finish(self) -> None:
        """The call ended without an error status: every minibatch asked for must have come."""
        if self.next < self.end:
            raise ProtocolError(f"the stream ended after {self.next - self._first} of the "
                                f"{self.end - self._first} minibatches asked for")
