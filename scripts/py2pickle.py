"""Writes pickles exactly as Python 2 wrote them for numpy arrays.

Python 3 cannot produce these streams: it writes ``bytes`` as
``_codecs.encode(str, 'latin1')`` at protocols 0-2, names numpy's modules
``numpy._core`` (numpy 2), and writes ``True``/``False`` for numpy's dtype
arguments. deeplearning.net's ``mnist.pkl.gz`` was written by Python 2's
``cPickle`` at protocol 2, so this module writes those opcodes by hand.

Two writers, matching the two Python 2 picklers:

* protocols 0 and 1: ``pickle.py`` (the pure-Python pickler). Memo keys start
  at 0 and *every* string, tuple, global and reduced object is memoized
  (``PUT`` / ``BINPUT``); a repeated one becomes ``GET`` / ``BINGET``.
  One-character strings are shared objects in Python 2, so the second ``'b'``
  or ``'<'`` is a ``GET``. Bools are ``I01\\n`` / ``I00\\n``.
* protocol 2: ``cPickle``. Memo keys start at 1 ("make sure memo keys are
  positive"), and ``put()`` skips objects whose reference count is below 2:
  the temporaries numpy's ``__reduce__`` builds (``(0,)``, the argument and
  state tuples, the shape tuple, the ``'f4'`` type code, the data string) are
  never memoized, and strings shorter than 2 bytes are never memoized.
  Globals and reduced objects with a tuple state (arrays, dtypes) always are.
  Containers the caller built and kept a name for (the ``(x, y)`` pairs and
  the outer tuple) are memoized. Bools are ``NEWTRUE`` / ``NEWFALSE``.

Protocol 2 opcode sequence for one float32 array of shape [n, 784] (as in
``mnist.pkl.gz``; ``q k`` = BINPUT k, ``h k`` = BINGET k):

    \\x80\\x02                                     PROTO 2 (once, at the start)
    c numpy.core.multiarray\\n_reconstruct\\n q k   GLOBAL (later: h k)
    c numpy\\nndarray\\n q k                        GLOBAL (later: h k)
    K 0, \\x85                                    BININT1 0, TUPLE1
    U \\x01 b                                     SHORT_BINSTRING 'b'
    \\x87, R, q k                                 TUPLE3, REDUCE, BINPUT (the array)
    (                                            MARK (array state)
      K 1                                        BININT1 1 (version)
      M n, M 784, \\x86                           shape: BININT1/BININT2/BININT, TUPLE1/2/3
                                                 (MARK ... TUPLE above 3 dimensions)
      c numpy\\ndtype\\n q k                        GLOBAL (later: h k)
      U \\x02 f4, K 0, K 1, \\x87, R, q k           SHORT_BINSTRING 'f4', BININT1 0, BININT1 1,
                                                 TUPLE3, REDUCE, BINPUT (the dtype)
      ( K 3, U \\x01 <, N N N,                     MARK, BININT1 3, SHORT_BINSTRING '<', NONE x3,
        J -1, J -1, K 0, t, b                    BININT -1, BININT -1, BININT1 0, TUPLE, BUILD
                                                 (a dtype seen before is just h k)
      \\x89                                        NEWFALSE (is_fortran)
      T <len:int32> <payload>                    BINSTRING (SHORT_BINSTRING under 256 bytes)
    t, b                                         TUPLE, BUILD

then ``\\x86 q k`` (TUPLE2, BINPUT) for each (x, y) pair, ``\\x87 q k``
(TUPLE3, BINPUT) for the outer tuple, and ``.`` (STOP).

The data string gets no BINPUT: cPickle's ``put()`` skips it (its only
reference is numpy's state tuple), as dumps of real cPickle output show
(``...\\x89U\\x0c<12 bytes>tb.``).

Protocol 0 spells the same objects in text (``cnumpy.core.multiarray\\n
_reconstruct\\np0\\n(cnumpy\\nndarray\\np1\\n(I0\\ntp2\\nS'b'\\np3\\ntp4\\nRp5\\n(I1\\n
(I7\\nI6\\ntp6\\ncnumpy\\ndtype\\np7\\n(S'f4'\\np8\\nI0\\nI1\\ntp9\\nRp10\\n(I3\\nS'<'\\n
p11\\nNNNI-1\\nI-1\\nI0\\ntp12\\nbI00\\nS'...'\\np13\\ntp14\\nb``) with the payload
as Python 2's ``repr`` of a str; protocol 1 uses the binary opcodes with
MARK-based tuples and ``I01\\n`` / ``I00\\n`` bools.

Only the standard library and numpy are needed; nothing here imports Python 2.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

__all__ = ["Global", "RawArray", "dumps", "py2_str_repr"]


@dataclass(frozen=True)
class Global:
    """A module-level name, written with GLOBAL."""

    module: str
    name: str


RECONSTRUCT = Global("numpy.core.multiarray", "_reconstruct")
NDARRAY = Global("numpy", "ndarray")
DTYPE = Global("numpy", "dtype")


class RawArray:
    """An array given as its pickled parts, so a test can write one whose
    payload does not match its shape (numpy would never produce that)."""

    def __init__(self, shape, dtype, payload: bytes, fortran: bool = False):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.payload = bytes(payload)
        self.fortran = bool(fortran)


def _array_parts(a):
    if isinstance(a, RawArray):
        return a.shape, a.dtype, a.fortran, a.payload
    if a.dtype.hasobject or a.dtype.fields is not None or a.dtype.subdtype is not None:
        raise ValueError(f"py2pickle writes plain numeric arrays only, not {a.dtype}")
    # numpy: PyArray_ISFORTRAN = F-contiguous and not C-contiguous; the data
    # is PyArray_ToString(self, NPY_ANYORDER), i.e. in the array's own order.
    fortran = bool(a.flags.f_contiguous and not a.flags.c_contiguous)
    payload = a.tobytes(order="F" if fortran else "C")
    return a.shape, a.dtype, fortran, payload


def _dtype_key(dt: np.dtype) -> str:
    return dt.str  # e.g. '<f4', '|u1', '>i8'


def _dtype_code(dt: np.dtype) -> str:
    # numpy's arraydescr_reduce: "%c%d" % (kind, elsize) for builtin types.
    return f"{dt.kind}{dt.itemsize}"


def _dtype_order(dt: np.dtype) -> str:
    if dt.itemsize == 1 or dt.byteorder == "|":
        return "|"
    if dt.byteorder == "=":
        return "<" if np.little_endian else ">"
    return dt.byteorder


def py2_str_repr(b: bytes) -> bytes:
    """Python 2's ``repr()`` of a ``str`` (Objects/stringobject.c, string_repr):
    single quotes unless the string holds ``'`` and no ``\"``; escapes
    ``\\\\``, the quote, ``\\t``, ``\\n``, ``\\r``; ``\\xhh`` for other bytes below
    0x20 or from 0x7f."""
    quote = b'"' if (b"'" in b and b'"' not in b) else b"'"
    out = bytearray(quote)
    for c in b:
        ch = bytes([c])
        if ch == quote or ch == b"\\":
            out += b"\\" + ch
        elif ch == b"\t":
            out += b"\\t"
        elif ch == b"\n":
            out += b"\\n"
        elif ch == b"\r":
            out += b"\\r"
        elif c < 0x20 or c >= 0x7F:
            out += b"\\x%02x" % c
        else:
            out += ch
    out += quote
    return bytes(out)


class _Writer:
    def __init__(self, protocol: int):
        if protocol not in (0, 1, 2):
            raise ValueError("Python 2 pickle protocols are 0, 1 and 2")
        self.proto = protocol
        self.bin = protocol >= 1
        self.cpickle = protocol == 2
        self.out = bytearray()
        self.memo: dict[object, int] = {}
        self.next_key = 1 if self.cpickle else 0
        self._keep = []  # keeps id()-keyed objects alive while writing

    # -- memo ---------------------------------------------------------------
    def put(self, key):
        i = self.next_key
        self.next_key += 1
        if key is not None:
            self.memo[key] = i
        if not self.bin:
            self.out += b"p%d\n" % i
        elif i < 256:
            self.out += b"q" + bytes([i])
        else:
            self.out += b"r" + struct.pack("<i", i)

    def get(self, key) -> bool:
        i = self.memo.get(key)
        if i is None:
            return False
        if not self.bin:
            self.out += b"g%d\n" % i
        elif i < 256:
            self.out += b"h" + bytes([i])
        else:
            self.out += b"j" + struct.pack("<i", i)
        return True

    # -- scalars ------------------------------------------------------------
    def save_none(self):
        self.out += b"N"

    def save_bool(self, v: bool):
        if self.proto >= 2:
            self.out += b"\x88" if v else b"\x89"
        else:
            self.out += b"I01\n" if v else b"I00\n"

    def save_int(self, v: int):
        v = int(v)
        if self.bin:
            if 0 <= v <= 0xFF:
                self.out += b"K" + bytes([v])
                return
            if 0 <= v <= 0xFFFF:
                self.out += b"M" + struct.pack("<H", v)
                return
            if -(2**31) <= v < 2**31:
                self.out += b"J" + struct.pack("<i", v)
                return
        self.out += b"I%d\n" % v

    def save_str(self, b: bytes, *, shared: bool = False):
        """A Python 2 ``str``. ``shared``: the same object appears elsewhere
        (Python 2 caches one-character strings)."""
        key = ("str", b) if (shared or len(b) == 1) else None
        if not self.cpickle and key is not None and self.get(key):
            return
        if self.bin:
            if len(b) < 256:
                self.out += b"U" + bytes([len(b)]) + b
            else:
                self.out += b"T" + struct.pack("<i", len(b)) + b
        else:
            self.out += b"S" + py2_str_repr(b) + b"\n"
        if not self.cpickle:
            self.put(key)  # pickle.py memoizes every string
        # cPickle: strings under 2 bytes are never memoized; the others here
        # are temporaries (refcount 1), which put() skips.

    # -- containers ---------------------------------------------------------
    def save_tuple(self, items, *, kept: bool, key=None):
        """``kept``: the tuple has another reference (cPickle memoizes it)."""
        if key is not None and self.get(key):
            return
        n = len(items)
        if n == 0:
            self.out += b")" if self.bin else b"(t"
            return
        if self.proto >= 2 and n <= 3:
            for it in items:
                self.save(it)
            self.out += bytes([0x84 + n])  # TUPLE1..TUPLE3
        else:
            self.out += b"("
            for it in items:
                self.save(it)
            self.out += b"t"
        if not self.cpickle or kept:
            self.put(key)

    def save_list(self, items, key=None):
        if key is not None and self.get(key):
            return
        if self.bin:
            self.out += b"]"
            self.put(key)
            for start in range(0, len(items), 1000):
                batch = items[start:start + 1000]
                if len(batch) == 1:
                    self.save(batch[0])
                    self.out += b"a"
                else:
                    self.out += b"("
                    for it in batch:
                        self.save(it)
                    self.out += b"e"
        else:
            self.out += b"(l"
            self.put(key)
            for it in items:
                self.save(it)
                self.out += b"a"

    # -- globals, dtypes, arrays -------------------------------------------
    def save_global(self, g: Global):
        key = ("global", g.module, g.name)
        if self.get(key):
            return
        self.out += b"c" + g.module.encode("ascii") + b"\n" + g.name.encode("ascii") + b"\n"
        self.put(key)

    def save_dtype(self, dt: np.dtype):
        key = ("dtype", _dtype_key(dt))
        if self.get(key):
            return
        # reduce: (numpy.dtype, ('f4', 0, 1), state)
        self.save_global(DTYPE)
        self.save_tuple([_Str(_dtype_code(dt).encode()), 0, 1], kept=False)
        self.out += b"R"
        self.put(key)
        # state: (3, byteorder, subarray, names, fields, elsize, alignment, flags)
        self.save_tuple([3, _Str(_dtype_order(dt).encode()), None, None, None, -1, -1, 0], kept=False)
        self.out += b"b"

    def save_array(self, a):
        key = ("array", id(a))
        if self.get(key):
            return
        self._keep.append(a)
        shape, dt, fortran, payload = _array_parts(a)
        # reduce: (_reconstruct, (ndarray, (0,), 'b'), state)
        self.save_global(RECONSTRUCT)
        self.save_tuple([NDARRAY, _Fresh((0,)), _Str(b"b")], kept=False)
        self.out += b"R"
        self.put(key)  # pickle.py memoize(obj); cPickle put2 (state is a tuple)
        # state: (1, shape, dtype, is_fortran, data)
        self.save_tuple([1, _Fresh(tuple(shape)), dt, bool(fortran), _Str(payload)], kept=False)
        self.out += b"b"

    # -- dispatch -----------------------------------------------------------
    def save(self, obj):
        if obj is None:
            self.save_none()
        elif isinstance(obj, (bool, np.bool_)):
            self.save_bool(bool(obj))
        elif isinstance(obj, (int, np.integer)):
            self.save_int(int(obj))
        elif isinstance(obj, _Str):
            self.save_str(obj.b)
        elif isinstance(obj, bytes):
            self._keep.append(obj)
            self.save_str(obj, shared=True)
        elif isinstance(obj, Global):
            self.save_global(obj)
        elif isinstance(obj, np.dtype):
            self.save_dtype(obj)
        elif isinstance(obj, (np.ndarray, RawArray)):
            self.save_array(obj)
        elif isinstance(obj, _Fresh):
            self.save_tuple(list(obj.t), kept=False)
        elif isinstance(obj, tuple):
            self._keep.append(obj)
            self.save_tuple(list(obj), kept=True, key=("obj", id(obj)))
        elif isinstance(obj, list):
            self._keep.append(obj)
            self.save_list(obj, key=("obj", id(obj)))
        else:
            raise TypeError(f"py2pickle cannot write {type(obj).__name__}")


class _Str:
    """A temporary Python 2 str (not shared with anything else)."""

    __slots__ = ("b",)

    def __init__(self, b: bytes):
        self.b = b


class _Fresh:
    """A temporary tuple (refcount 1 in cPickle: never memoized there)."""

    __slots__ = ("t",)

    def __init__(self, t: tuple):
        self.t = t


def dumps(obj, protocol: int = 2) -> bytes:
    """Pickles ``obj`` (tuples, lists, ints, bools, None, bytes as Python 2
    ``str``, numpy arrays, :class:`RawArray`) as Python 2 would: protocol 2 as
    ``cPickle``, protocols 0 and 1 as ``pickle.py``."""
    w = _Writer(protocol)
    if protocol >= 2:
        w.out += b"\x80" + bytes([protocol])
    w.save(obj)
    w.out += b"."
    return bytes(w.out)
