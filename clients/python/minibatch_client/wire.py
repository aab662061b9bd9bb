"""The chunk protocol: TensorChunk messages in, verified numpy arrays out.

A minibatch arrives as chunks of `x`, then of `y`, then (when asked) of
`indices`; each carries its byte `offset` in the tensor, the tensor's
`total_bytes`, and a CRC-32C of its `data`; the minibatch's final chunk has
`last` set. The client asks grpcio for the raw message bytes (no protobuf
decoding) and reads the fields with the small reader below over a memoryview,
so a chunk's payload is copied exactly once: from the message into the
tensor's buffer, allocated whole when its first chunk arrives.

That is the grpcio transport's path. The native transport reassembles whole
minibatches itself, with the same checks (crates/tensor-chunks), and hands
over writable buffers: batch_from_native() wraps them; batches() picks the
path for a call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from ._crc32c import crc32c
from .dtypes import DTYPES
from .errors import ChecksumError, ProtocolError

# --- a minimal protobuf reader for TensorChunk -------------------------------

def _varint(b: bytes, p: int) -> tuple[int, int]:
    c = b[p]
    if c < 0x80:
        return c, p + 1
    r = c & 0x7F
    s = 7
    while True:
        p += 1
        c = b[p]
        r |= (c & 0x7F) << s
        if c < 0x80:
            return r, p + 1
        s += 7
        if s > 63:
            raise ProtocolError("malformed varint in TensorChunk")


class Chunk:
    """The fields of one TensorChunk; `data` is a memoryview into the message."""

    __slots__ = ("index", "name", "dtype", "shape", "offset", "data", "crc32c", "total_bytes", "scale_divisor", "last")

    def __init__(self):
        self.index = 0
        self.name = b""
        self.dtype = 0
        self.shape: list[int] = []
        self.offset = 0
        self.data = memoryview(b"")
        self.crc32c = 0
        self.total_bytes = 0
        self.scale_divisor = 0
        self.last = False


def parse_chunk(msg: bytes) -> Chunk:
    """Reads a serialized TensorChunk (proto3 wire format; unknown fields skipped)."""
    c = Chunk()
    mv = memoryview(msg)
    n = len(msg)
    p = 0
    try:
        while p < n:
            key = msg[p]  # every TensorChunk key is one byte; _varint reads longer ones
            if key < 0x80:
                p += 1
            else:
                key, p = _varint(msg, p)
            field, wt = key >> 3, key & 7
            if wt == 0:
                v = msg[p]
                if v < 0x80:
                    p += 1
                else:
                    v, p = _varint(msg, p)
                if field == 1:
                    c.index = v
                elif field == 3:
                    c.dtype = v
                elif field == 4:
                    c.shape.append(v)
                elif field == 5:
                    c.offset = v
                elif field == 8:
                    c.total_bytes = v
                elif field == 9:
                    c.scale_divisor = v
                elif field == 10:
                    c.last = v != 0
            elif wt == 2:
                ln, p = _varint(msg, p)
                end = p + ln
                if end > n:
                    raise ProtocolError("truncated TensorChunk")
                if field == 6:
                    c.data = mv[p:end]
                elif field == 2:
                    c.name = bytes(mv[p:end])
                elif field == 4:  # packed repeated uint64
                    q = p
                    while q < end:
                        v, q = _varint(msg, q)
                        c.shape.append(v)
                p = end
            elif wt == 5:
                if p + 4 > n:
                    raise ProtocolError("truncated TensorChunk")
                if field == 7:
                    c.crc32c = int.from_bytes(mv[p:p + 4], "little")
                p += 4
            elif wt == 1:
                p += 8
            else:
                raise ProtocolError(f"unsupported wire type {wt} in TensorChunk")
    except IndexError:
        raise ProtocolError("truncated TensorChunk") from None
    if p != n:
        raise ProtocolError("truncated TensorChunk")
    return c


# --- reassembly ----------------------------------------------------------------

@dataclass
class Tensor:
    """One reassembled tensor: `array` has the wire dtype and the full shape."""

    name: str
    dtype: str
    array: np.ndarray
    scale_divisor: int = 0


@dataclass
class Batch:
    """One minibatch as it came off the wire."""

    index: int
    x: Tensor
    y: Tensor
    indices: Optional[Tensor] = None


class _Partial:
    __slots__ = ("name", "dtype", "shape", "total", "scale", "buf", "view", "filled")

    def __init__(self, c: Chunk):
        self.name = c.name
        self.dtype = c.dtype
        self.shape = tuple(c.shape)
        self.total = c.total_bytes
        self.scale = c.scale_divisor
        self.buf = np.empty(c.total_bytes, dtype=np.uint8)
        self.view = memoryview(self.buf)
        self.filled = 0

    def finish(self) -> Tensor:
        name = self.name.decode("utf-8", "replace")
        if self.dtype not in DTYPES:
            raise ProtocolError(f"tensor {name}: unknown dtype value {self.dtype}")
        dname, npd = DTYPES[self.dtype]
        want = math.prod(self.shape) * npd.itemsize
        if want != self.total:
            raise ProtocolError(f"tensor {name}: shape {list(self.shape)} of {dname} needs {want} bytes, total_bytes is {self.total}")
        return Tensor(name, dname, self.buf.view(npd).reshape(self.shape), self.scale)


class Assembler:
    """Feeds on raw TensorChunk messages; returns each minibatch when complete.
    Checks CRC-32C (unless verify_crc=False), offsets, lengths and order."""

    def __init__(self, verify_crc: bool = True):
        self.verify_crc = verify_crc
        self._reset()

    def _reset(self):
        self.index: Optional[int] = None
        self.tensors: list[_Partial] = []
        self.cur: Optional[_Partial] = None

    def push(self, msg: bytes) -> Optional[Batch]:
        c = parse_chunk(msg)
        data = c.data
        if self.verify_crc and crc32c(data) != c.crc32c:
            raise ChecksumError(
                f"minibatch {c.index}, tensor {c.name.decode('utf-8', 'replace')}: chunk at offset {c.offset} "
                "failed its CRC-32C check (data corrupted in transit)")
        if self.index is None:
            self.index = c.index
        elif c.index != self.index:
            raise ProtocolError(f"minibatch {c.index} began before minibatch {self.index} ended")
        cur = self.cur
        if cur is None or cur.name != c.name:
            if cur is not None and cur.filled != cur.total:
                raise ProtocolError(f"tensor {cur.name!r} ended at {cur.filled} of {cur.total} bytes")
            if c.offset != 0:
                raise ProtocolError(f"tensor {c.name!r} starts at offset {c.offset}")
            if any(t.name == c.name for t in self.tensors):
                raise ProtocolError(f"tensor {c.name!r} sent twice in minibatch {c.index}")
            cur = self.cur = _Partial(c)
            self.tensors.append(cur)
        n = len(data)
        off = c.offset
        if off != cur.filled or off + n > cur.total:
            raise ProtocolError(f"tensor {c.name!r}: chunk at offset {off} ({n} bytes) out of order or past total_bytes {cur.total}")
        if n:
            cur.view[off:off + n] = data
        cur.filled = off + n
        if not c.last:
            return None
        if cur.filled != cur.total:
            raise ProtocolError(f"tensor {c.name!r} ended at {cur.filled} of {cur.total} bytes")
        found = {t.name: t.finish() for t in self.tensors}
        index = self.index
        self._reset()
        if b"x" not in found or b"y" not in found:
            raise ProtocolError(f"minibatch {index} lacks x or y (got {sorted(k.decode() for k in found)})")
        return Batch(index, found[b"x"], found[b"y"], found.get(b"indices"))

    def finish(self) -> None:
        """Call when the stream ends: a half-received minibatch is an error."""
        if self.tensors:
            raise ProtocolError(f"stream ended in the middle of minibatch {self.index}")


def batch_from_native(t) -> Batch:
    """A minibatch the native transport reassembled (Call.next_batch):
    (index, [(name, dtype, shape, scale_divisor, writable buffer), ...])."""
    index, tensors = t
    found = {}
    for name, code, shape, scale, buf in tensors:
        if code not in DTYPES:
            raise ProtocolError(f"tensor {name}: unknown dtype value {code}")
        dname, npd = DTYPES[code]
        if math.prod(shape) * npd.itemsize != len(buf):
            raise ProtocolError(f"tensor {name}: shape {list(shape)} of {dname} needs "
                                f"{math.prod(shape) * npd.itemsize} bytes, total_bytes is {len(buf)}")
        found[name] = Tensor(name, dname, np.frombuffer(buf, npd).reshape(shape), scale)
    return Batch(index, found["x"], found["y"], found.get("indices"))  # x and y: checked natively


def batches(call, verify_crc: bool = True) -> Iterator[Batch]:
    """The minibatches of a GetBatch/StreamBatches call of either transport:
    the native one reassembles them itself (`batches`), grpcio's messages go
    through the Assembler here. Raises ProtocolError/ChecksumError for a bad
    stream; the transport's own errors for the call's status."""
    native = getattr(call, "batches", None)
    if native is not None:
        yield from native(verify_crc)
        return
    asm = Assembler(verify_crc)
    for msg in call:
        b = asm.push(msg)
        if b is not None:
            yield b
    asm.finish()
