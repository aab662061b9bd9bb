"""CRC-32C (Castagnoli), the checksum of every TensorChunk.

Uses the native transport's `crc32c` when minibatch-client-native is
installed (crc-fast: AVX-512 carry-less multiplication where the CPU has it,
about 3x the next), else the `crc32c` package (hardware CRC32 instructions,
~20-30 GB/s), as `pip install ./clients/python` installs. Otherwise a pure numpy
fallback computes the same value: the data is cut into up to 4,096 lanes that
advance one byte per step together (table-driven), and the lane CRCs are then
combined pairwise with precomputed "append n zero bytes" operators (the trick
of zlib's crc32_combine). It runs near 100 MB/s, enough for correctness, slow
for training: install `crc32c`, or pass `verify_crc=False` to the client.
"""
from __future__ import annotations

import functools

import numpy as np

try:  # pragma: no cover - depends on the environment
    from crc32c import crc32c as _native

    BACKEND = "crc32c"
except ImportError:  # pragma: no cover
    _native = None
    BACKEND = "numpy"

try:  # pragma: no cover - the optional native transport's CRC (AVX-512 where present: ~3x the crc32c package)
    from minibatch_client_native import crc32c as _fast

    BACKEND = "minibatch-client-native"
except ImportError:  # pragma: no cover
    _fast = None

POLY = 0x82F63B78  # reflected Castagnoli polynomial
_LANES = 4096
_MIN_LANE_BYTES = 64


def _make_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(POLY), t >> 1).astype(np.uint32)
    return t


_TABLE = _make_table()
_TABLE_PY = [int(v) for v in _TABLE]


def _raw_py(reg: int, data) -> int:
    """CRC register after `data`, no pre/post inversion (pure Python; short inputs)."""
    t = _TABLE_PY
    for b in bytes(data):
        reg = (reg >> 8) ^ t[(reg ^ b) & 0xFF]
    return reg


def _apply(op: list[int], v: int) -> int:
    """Applies a GF(2) 32x32 operator given by its 32 columns to v."""
    r = 0
    i = 0
    while v:
        if v & 1:
            r ^= op[i]
        v >>= 1
        i += 1
    return r


def _compose(a: list[int], b: list[int]) -> list[int]:
    """The operator a∘b (b first)."""
    return [_apply(a, col) for col in b]


@functools.lru_cache(maxsize=64)
def _shift_op(nbytes: int) -> tuple[int, ...]:
    """Columns of the operator reg -> register after nbytes zero bytes."""
    one = [_raw_py(1 << i, b"\0") for i in range(32)]
    result = [1 << i for i in range(32)]
    power = one
    n = nbytes
    while n:
        if n & 1:
            result = _compose(power, result)
        n >>= 1
        if n:
            power = _compose(power, power)
    return tuple(result)


@functools.lru_cache(maxsize=64)
def _shift_tables(nbytes: int) -> np.ndarray:
    """[4, 256] tables: op(r) = T0[r & 255] ^ T1[r >> 8 & 255] ^ T2[..] ^ T3[r >> 24]."""
    op = list(_shift_op(nbytes))
    out = np.zeros((4, 256), dtype=np.uint32)
    for p in range(4):
        for v in range(256):
            out[p, v] = _apply(op, v << (8 * p))
    return out


def _apply_tables(t: np.ndarray, r: np.ndarray) -> np.ndarray:
    return t[0][r & 0xFF] ^ t[1][(r >> 8) & 0xFF] ^ t[2][(r >> 16) & 0xFF] ^ t[3][r >> 24]


def _crc32c_numpy(data) -> int:
    buf = np.frombuffer(data, dtype=np.uint8)
    n = buf.size
    if n < 2 * _MIN_LANE_BYTES:
        return _raw_py(0xFFFFFFFF, buf) ^ 0xFFFFFFFF
    lanes = _LANES
    while lanes > 1 and n < lanes * _MIN_LANE_BYTES:
        lanes //= 2
    m = -(-n // lanes)
    # Leading zero bytes leave a zero register at zero, so pad at the front.
    padded = np.zeros(lanes * m, dtype=np.uint8)
    padded[lanes * m - n:] = buf
    blocks = padded.reshape(lanes, m)
    reg = np.zeros(lanes, dtype=np.uint32)
    for k in range(m):
        reg = (reg >> 8) ^ _TABLE[(reg ^ blocks[:, k]) & 0xFF]
    span = m
    while reg.size > 1:
        reg = _apply_tables(_shift_tables(span), reg[0::2]) ^ reg[1::2]
        span *= 2
    raw = int(reg[0])
    # The 0xFFFFFFFF initial register, carried over all n real bytes.
    raw ^= _apply(list(_shift_op(n)), 0xFFFFFFFF)
    return raw ^ 0xFFFFFFFF


def crc32c_numpy(data) -> int:
    """CRC-32C of a bytes-like object with the numpy fallback (for tests)."""
    return _crc32c_numpy(data)


def crc32c(data) -> int:
    """CRC-32C of a bytes-like object (bytes, bytearray, memoryview)."""
    if _fast is not None:
        try:
            return _fast(data)
        except (TypeError, ValueError, BufferError):  # not a C-contiguous byte buffer
            pass
    if _native is not None:
        return _native(data)
    return _crc32c_numpy(data)
