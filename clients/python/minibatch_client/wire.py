"""The chunk protocol as the grpcio transport receives it: raw TensorChunk
messages in, verified numpy arrays out.

A minibatch arrives as chunks of `x`, then of `y`, then (when asked) of
`indices`; each carries its byte `offset` in the tensor, the tensor's
`total_bytes`, and a CRC-32C of its `data`; the minibatch's final chunk has
`last` set. The client asks grpcio for the raw message bytes (no protobuf
decoding) and reads the fields with the small reader below over a memoryview,
so a chunk's payload is copied exactly once: from the message into the
tensor's buffer, allocated whole when its first chunk arrives, once
expect.Expected has checked the tensor's declared dtype, shape and size
against the request.

The native transport reassembles whole minibatches itself with the same
rules (crates/tensor-chunks) and hands them to the same Expected checks
(transport.py); Tensor and Batch are what both transports return.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ._crc32c import crc32c
from .dtypes import decode_x, dtype_name
from .errors import ChecksumError, ProtocolError
from .expect import Expected, over_the_servers_limit, where


# --- a minimal protobuf reader for TensorChunk -------------------------------

def _bad(why: str) -> ProtocolError:
    return ProtocolError(f"response message is not a valid TensorChunk: {why}")


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
            raise _bad("malformed varint")


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
                    raise _bad("truncated")
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
                    raise _bad("truncated")
                if field == 7:
                    c.crc32c = int.from_bytes(mv[p:p + 4], "little")
                p += 4
            elif wt == 1:
                p += 8
            else:
                raise _bad(f"unsupported wire type {wt}")
    except IndexError:
        raise _bad("truncated") from None
    if p != n:
        raise _bad("truncated")
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
    #: present when the request asked for indices (expect.Expected makes sure)
    indices: Optional[Tensor] = None

    def arrays(self, decode: bool, with_indices: bool) -> tuple[np.ndarray, ...]:
        """What get_batch and epochs return: (x, y) or (x, y, indices), x
        decoded to float32 when asked."""
        x = decode_x(self.x) if decode else self.x.array
        if with_indices:
            return x, self.y.array, self.indices.array
        return x, self.y.array


class _Partial:
    """A tensor being received: its buffer, allocated once its header passed
    Expected.tensor, and how many bytes of it have come."""

    __slots__ = ("raw_name", "name", "code", "dtype", "shape", "total", "scale", "buf", "view", "filled", "chunks")

    def __init__(self, c: Chunk, name: str, npd: np.dtype, index: int):
        self.raw_name = c.name
        self.name = name
        self.code = c.dtype
        self.dtype = npd
        self.shape = c.shape
        self.total = c.total_bytes
        self.scale = c.scale_divisor
        try:
            self.buf = np.empty(c.total_bytes, dtype=np.uint8)
        except (MemoryError, ValueError) as e:  # a size the request allowed, but this machine cannot hold
            raise ProtocolError(f"{where(index, name)}: cannot allocate its {c.total_bytes} bytes: {e}") from None
        self.view = memoryview(self.buf)
        self.filled = 0
        self.chunks = 0

    def finish(self) -> Tensor:
        return Tensor(self.name, dtype_name(self.code), self.buf.view(self.dtype).reshape(self.shape), self.scale)


class Assembler:
    """Feeds on the raw TensorChunk messages of one call; returns each
    minibatch when complete. Checks, in the native transport's order
    (crates/tensor-chunks) and with its words: the message's size against the
    server's advertised limit, the minibatch index and count, each tensor's
    header against `expected` before anything is allocated, then per chunk
    its offset, that total_bytes, dtype and shape stay as the first chunk
    said, that it carries data and stays within total_bytes, and its CRC-32C
    (unless verify_crc=False).

    Each chunk must carry data (only an empty tensor has one empty chunk), so
    a tensor takes at most total_bytes chunks: with its size bounded by the
    request, so is every stream."""

    def __init__(self, expected: Expected, verify_crc: bool = True):
        self.expected = expected
        self.verify_crc = verify_crc
        self._reset()

    def _reset(self):
        self.index: Optional[int] = None
        self.tensors: list[_Partial] = []
        self.cur: Optional[_Partial] = None

    def push(self, msg: bytes) -> Optional[Batch]:
        limit = self.expected.max_message_bytes
        if limit is not None and len(msg) > limit:
            raise over_the_servers_limit(len(msg), limit)
        c = parse_chunk(msg)
        if self.index is None:
            self.expected.begin(c.index)
            self.index = c.index
        elif c.index != self.index:
            raise ProtocolError(f"minibatch {c.index} began before minibatch {self.index} ended")
        index = self.index
        cur = self.cur
        if cur is None or cur.raw_name != c.name:
            if cur is not None and cur.filled != cur.total:
                raise ProtocolError(f"{where(index, cur.name)} ended at {cur.filled} of {cur.total} bytes")
            name = c.name.decode("utf-8", "replace")
            npd = self.expected.tensor(name, c.dtype, c.shape, c.total_bytes, c.offset)
            cur = self.cur = _Partial(c, name, npd, index)
            self.tensors.append(cur)
        data = c.data
        n = len(data)
        off = c.offset
        if off != cur.filled:
            raise ProtocolError(f"{where(index, cur.name)}: chunk at offset {off} out of order "
                                f"(expected offset {cur.filled})")
        changed = ("total_bytes" if c.total_bytes != cur.total else "dtype" if c.dtype != cur.code else
                   "shape" if c.shape != cur.shape else None)
        if changed:
            raise ProtocolError(f"{where(index, cur.name)}: {changed} changed between chunks (at offset {off})")
        if n == 0 and (cur.total != 0 or cur.chunks > 0):
            raise ProtocolError(f"{where(index, cur.name)}: empty chunk at offset {off} "
                                "(only a 0-byte tensor's one chunk may be empty)")
        if n > cur.total - off:
            raise ProtocolError(f"{where(index, cur.name)}: chunk at offset {off} of {n} bytes runs past "
                                f"total_bytes {cur.total}")
        if self.verify_crc and crc32c(data) != c.crc32c:
            raise ChecksumError(f"{where(index, cur.name)}: chunk at offset {off} failed its CRC-32C check "
                                "(data corrupted in transit)")
        if n:
            cur.view[off:off + n] = data
        cur.filled = off + n
        cur.chunks += 1
        if not c.last:
            return None
        if cur.filled != cur.total:
            raise ProtocolError(f"{where(index, cur.name)} ended at {cur.filled} of {cur.total} bytes")
        self.expected.complete()
        found = {t.name: t.finish() for t in self.tensors}
        self._reset()
        return Batch(index, found["x"], found["y"], found.get("indices"))

    def finish(self) -> None:
        """Call when the stream ends without an error status: a half-received
        minibatch, or fewer minibatches than asked for, is an error."""
        if self.index is not None:
            raise ProtocolError(f"the stream ended in the middle of minibatch {self.index}")
        self.expected.finish()
