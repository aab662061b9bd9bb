"""What one GetBatch or StreamBatches call may receive, worked out before the
call starts: which minibatches, in which order, and for each tensor its
dtype and exact shape, hence its size in bytes.

Why: every chunk declares its tensor's shape and `total_bytes`, and the
grpcio transport allocates the tensor whole when its first chunk arrives
(one copy per byte). Trusting those numbers let a broken or hostile server
make a client allocate 2**40 bytes (numpy's MemoryError, outside the
client's errors) or stream to it without end. So no number a server sends
is used before it is checked against what the client already knows:

- the request: the set, the minibatch size, the order (shard, offset
  and drop_last), the wire dtypes asked for, whether indices were asked for,
  and for StreamBatches `start` and `count`;
- the server's GetInfo, read once per server before its first minibatch
  (Client._described): the examples in the set, the shape of one example
  and the stored dtype of x and y;
- the order arithmetic the server uses (order.py): minibatch i of size s
  holds min(s, shard - i*s) examples, and the order has num_batches of them.

Anything else (another minibatch index, one minibatch more than asked for,
a tensor not asked for or out of order, another dtype or shape, total_bytes
that is not shape x item size, the stream ending early) is a ProtocolError.
Both transports check here: grpcio's chunks go through wire.Assembler, which
asks at the first chunk of each minibatch and tensor, before allocating; the
native transport's Rust side (crates/tensor-chunks) holds every chunk to the
same bounds first, once the client has handed it the same GetInfo
(Channel.learn_info), and hands each whole minibatch here. The checks come
in the Rust side's order and with its key words (its error for a case is
the one a native call raises), so a bad stream reads the same on both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NoReturn, Optional, Sequence, Union

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


def short(name: str) -> str:
    """A name from the wire, shortened for an error message (a hostile server
    cannot make one large); the Rust side's rule (crates/tensor-chunks)."""
    return name if len(name) <= 32 else name[:32] + "\u2026"


def dims(shape: Sequence[int]) -> str:
    """A shape from the wire, its first dimensions only, for an error message."""
    if len(shape) <= 8:
        return str(list(shape))
    return f"{list(shape[:8])}\u2026 ({len(shape)} dimensions)"


def where(index: int, name: str) -> str:
    """Where in the stream: "minibatch 3, tensor x" (the native transport's words too)."""
    return f"minibatch {index}, tensor {short(name)}"


def quoted(name: str) -> str:
    """A name from the wire in quotes, shortened (as the Rust side writes it)."""
    return '"' + short(name) + '"'


def over_the_servers_limit(size: int, limit: int, address: Optional[str] = None) -> ProtocolError:
    """A message the server sent over its own advertised limit (GetInfo's
    limits.max_message_bytes): wire.Assembler finds it for grpcio, the Rust
    side for the native transport (transport.py translates); both say this."""
    return ProtocolError(f"a message of {size} bytes, over the server's own limit of {limit} "
                         "(max_message_bytes in its GetInfo)", address=address)


#: what is due after the last tensor a minibatch has (the Rust side's words)
_END = "the minibatch's end (its final chunk was not marked last)"


class Expected:
    """The minibatches one call may send, checked as they arrive. One per
    call: it keeps count of the minibatches received, and of the tensors of
    the current one.

    The checks, their order and their wording follow the native transport's
    (crates/tensor-chunks: Assembler, ChunkError), so that a bad stream gets
    the same error, with the same key words, on both transports."""

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
                                              drop_last=o.drop_last, offset=o.offset) - first
            except ValueError:  # size 0, more ranks than examples, or offset past the end
                pass
            self._shard = order.shard_len(s.examples, world_size=o.world_size, offset=min(o.offset, s.examples))
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
        #: tensors of the current minibatch begun so far (they come in the order of _tensors)
        self._slot = 0
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
        if self.next >= self.end:
            asked = self.end - self._first
            raise ProtocolError(f"minibatch {index} is one more than the {asked} the call asked for "
                                f"(minibatches {self._first} to {self.end - 1})" if asked else
                                f"minibatch {index} was sent for a request that has no minibatches")
        if index != self.next:
            raise ProtocolError(f"minibatch {index} arrived where minibatch {self.next} was due "
                                f"(expected minibatch {self.next}, got {index})")
        self._slot = 0

    def tensor(self, name: str, dtype: int, shape: Sequence[int], total_bytes: int, offset: int = 0) -> np.dtype:
        """A tensor of the current minibatch starts (its first chunk, at
        `offset`): it must be the one due (x, then y, then indices when
        asked), start at offset 0, and its declared dtype, size and shape
        must be what the request implies; checked in that order, the size
        before the shape, as the native transport does. Returns the numpy
        dtype its bytes are read as."""
        names = list(self._tensors)
        due = names[self._slot] if self._slot < len(names) else None
        if name != due:
            if name in names[self._slot:]:  # a later tensor came first: the one due is missing
                self._missing(due)
            raise ProtocolError(f"minibatch {self.next}: tensor {quoted(name)} arrived where "
                                f"{quoted(due) if due else _END} was due")
        at = where(self.next, name)
        if offset != 0:
            raise ProtocolError(f"{at}: starts at offset {offset}")
        t = self._tensors[name]
        if dtype not in DTYPES:
            raise ProtocolError(f"{at}: dtype {dtype} where a known dtype was asked for")
        if dtype != t.dtype:
            raise ProtocolError(f"{at}: dtype {dtype} where dtype {t.dtype} was asked for "
                                f"({dtype_name(dtype)}, not {dtype_name(t.dtype)})")
        npd = DTYPES[dtype][1]
        rows = min(self._size, self._shard - self.next * self._size)
        want = (rows, *t.example)
        row_bytes = math.prod(t.example) * npd.itemsize
        nbytes = rows * row_bytes
        shape = tuple(shape)
        # First the bound of the request, whatever the shape says.
        if total_bytes > nbytes:
            raise ProtocolError(f"{at}: total_bytes {total_bytes} exceeds the {nbytes} bytes asked for (" +
                                (f"shape {dims(shape)}, the request implies {dims(want)})" if shape != want else
                                 f"{rows} rows of {row_bytes} bytes)"))
        if not shape:
            raise ProtocolError(f"{at}: shape [] where [rows, ...] was expected")
        if shape[0] != rows:
            raise ProtocolError(f"{at}: {shape[0]} rows where exactly {rows} were asked for "
                                f"(shape {dims(shape)}, the request implies {dims(want)})")
        if shape != want:
            raise ProtocolError(f"{at}: shape {dims(shape)} where {dims(want)} was expected")
        if total_bytes != nbytes:
            raise ProtocolError(f"{at}: shape {dims(want)} of dtype {dtype} does not make total_bytes "
                                f"{total_bytes} ({dtype_name(dtype)}: {nbytes} bytes)")
        self._slot += 1
        return npd

    def _missing(self, name: str) -> NoReturn:
        what = "the indices asked for" if name == "indices" else "x or y"
        raise ProtocolError(f"minibatch {self.next} lacks {what} (tensor {quoted(name)} missing)")

    def complete(self) -> None:
        """The current minibatch's last chunk came: it must hold every tensor asked for."""
        names = list(self._tensors)
        if self._slot < len(names):
            self._missing(names[self._slot])
        self.next += 1

    def finish(self) -> None:
        """The call ended without an error status: every minibatch asked for must have come."""
        if self.next < self.end:
            raise ProtocolError(f"the stream ended after {self.next - self._first} of the "
                                f"{self.end - self._first} minibatches the call asked for")
