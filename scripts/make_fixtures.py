#!/usr/bin/env python3
"""Writes every pickle variant minibatchd's loader must accept, and hostile
files it must reject, with a manifest.json that says what to expect.

Usage: python3 scripts/make_fixtures.py OUTDIR

Every accepted file is a small dataset in mnist.pkl.gz's layout,
``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))``, with 7 / 3 / 2
examples, x holding random multiples of 1/256 (or random values of its
integer / bool dtype) and y random labels 0-9, from a fixed seed.

manifest.json:

    {"numpy": "2.4.6", "python": "3.11.7",
     "files": [{"file": "np2-p2.pkl", "description": "...",
                "sets": [{"name": "train", "examples": 7,
                          "x": {"dtype": "float32", "shape": [7, 784], "sha256": "..."},
                          "y": {"dtype": "int64", "shape": [7], "sha256": "..."}},
                         ...]}, ...],
     "hostile": [{"file": "hostile/os-system.pkl", "description": "...",
                  "error_any": ["refusing global os.system"]}, ...]}

The expected tensors come from numpy itself: ``pickle.load(f,
encoding='latin1')``, then for a list of arrays (the tutorial's other form)
``np.stack(list)``, for a list of Python ints ``np.asarray(list,
dtype=np.int64)``; dtype is numpy's name of the array's type (byte order
dropped) and sha256 is of ``np.ascontiguousarray(a,
a.dtype.newbyteorder('<')).tobytes()``, i.e. little-endian C order, what the
loader must serve. A hostile file's ``error_any`` lists substrings of which
the loader's error message must contain at least one.

``.npz`` archives (and a directory of ``.npy`` files, ``npy-dir``) (Keras's ``mnist.npz`` layout: ``x_train, y_train,
x_test, y_test``, written by ``np.savez`` and ``np.savez_compressed``) are
listed under ``"npz"``, each with the ``valid_split`` to load it with; their
expected tensors are what ``np.load`` reads back, as the loader serves them:
x as served (see ``served_x``: grayscale images flattened to ``[n, H*W]``,
images with channels kept), uint8 / int8 y
widened to int64, train split into its first ``n - valid_split`` examples
("train") and the rest ("valid"). Hostile ``.npz`` files join ``"hostile"``.

The ``"npz"`` list also holds gzip'd ``.npz`` files, archives and ``.npy``
directories with a given ``x_valid`` / ``y_valid`` pair (then "valid" is that
pair and nothing is split), and IDX directories in the exact layout of
Fashion-MNIST (gzip'd) and KMNIST (unzipped) and of [n, 32, 32, 3] images,
each with its ``format`` ("npz", "npy", "idx").

``"cifar"`` lists CIFAR-10 / CIFAR-100 python-version archives and folders:
the ``.tar.gz`` as downloaded (Python 2 cPickle batches written by hand,
``CPickleDictWriter``, GNU tar in the real archive's member order), Python 3
re-pickles (protocols 2-5, str or bytes keys, numpy 1.x or 2.x names) in
GNU, ustar and pax tars, a plain tar, and extracted folders (the top folder
and the batches folder). Their expected sets are what torchvision's loading
gives: ``pickle.load(f, encoding='latin1')`` per batch, ``np.vstack``,
``reshape(-1, 3, 32, 32)``, labels as int64 ("train", "test"; CIFAR-100 adds
"train_coarse", "test_coarse" with the coarse labels). Hostile archives
(links, devices, fifos, ``..`` and absolute members, lying size fields,
truncation) and batches (labels and rows disagreeing, labels out of range or
not ints, data of another dtype or shape, a forbidden global) join
``"hostile"``.

Writers:
* ``np2``: Python 3's own pickler with the installed numpy 2.x, whose
  streams name ``numpy._core.multiarray._reconstruct`` (protocols 0-4),
  ``numpy._core.numeric._frombuffer`` (protocol 5) and
  ``numpy._core.multiarray.scalar``.
* ``np1``: the pure-Python ``pickle._Pickler`` with ``save_global``
  remapping ``numpy._core`` to ``numpy.core``, i.e. what numpy 1.x wrote.
* ``py2``: scripts/py2pickle.py, Python 2's opcodes written by hand
  (protocols 0 and 1 as pickle.py, protocol 2 as cPickle).
"""
from __future__ import annotations

import _compat_pickle
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import types
import warnings
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import py2pickle  # noqa: E402

SEED = 20240229
SIZES = (7, 3, 2)
NAMES = ("train", "valid", "test")


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------

def values(rng, shape, dtype) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        a = rng.integers(0, 256, size=shape) / 256
    elif dt.kind == "b":
        a = rng.integers(0, 2, size=shape)
    else:
        info = np.iinfo(dt.newbyteorder("="))
        a = rng.integers(info.min, info.max, size=shape, dtype=np.int64, endpoint=True)
    return np.asarray(a).astype(dt)


def dataset(seed, *, width=6, row_shape=None, xdtype="<f4", ydtype="<i8", sizes=SIZES):
    rng = np.random.default_rng(seed)
    row = tuple(row_shape) if row_shape is not None else (width,)
    sets = []
    for n in sizes:
        x = values(rng, (n,) + row, xdtype)
        y = rng.integers(0, 10, size=n).astype(ydtype)
        sets.append((x, y))
    return tuple(sets)


# ---------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------

def np2(obj, protocol: int) -> bytes:
    return pickle.dumps(obj, protocol=protocol)


class NumPy1Pickler(pickle._Pickler):
    """The pure-Python pickler, naming numpy's modules as numpy 1.x did."""

    dispatch = pickle._Pickler.dispatch.copy()

    @staticmethod
    def remap(module: str) -> str:
        if module == "numpy._core" or module.startswith("numpy._core."):
            return "numpy.core" + module[len("numpy._core"):]
        return module

    def save_global(self, obj, name=None):
        # As pickle._Pickler.save_global (Python 3.11), minus the import check
        # (numpy 2 warns on importing numpy.core), with the module remapped.
        write = self.write
        if name is None:
            name = getattr(obj, "__qualname__", None) or obj.__name__
        module_name = self.remap(pickle.whichmodule(obj, name))
        if self.proto >= 4:
            self.save(module_name)
            self.save(name)
            write(pickle.STACK_GLOBAL)
        elif self.proto >= 3:
            write(pickle.GLOBAL + bytes(module_name, "utf-8") + b"\n" + bytes(name, "utf-8") + b"\n")
        else:
            if self.fix_imports:
                r_name_mapping = _compat_pickle.REVERSE_NAME_MAPPING
                r_import_mapping = _compat_pickle.REVERSE_IMPORT_MAPPING
                if (module_name, name) in r_name_mapping:
                    module_name, name = r_name_mapping[(module_name, name)]
                elif module_name in r_import_mapping:
                    module_name = r_import_mapping[module_name]
            write(pickle.GLOBAL + bytes(module_name, "ascii") + b"\n" + bytes(name, "ascii") + b"\n")
        self.memoize(obj)

    dispatch[types.FunctionType] = save_global


def np1(obj, protocol: int) -> bytes:
    f = io.BytesIO()
    NumPy1Pickler(f, protocol=protocol).dump(obj)
    return f.getvalue()


def py2(obj, protocol: int) -> bytes:
    return py2pickle.dumps(obj, protocol)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


# ---------------------------------------------------------------------------
# expectations
# ---------------------------------------------------------------------------

def expected_tensor(v):
    if isinstance(v, np.ndarray):
        a = v
    elif isinstance(v, (list, tuple)) and v and all(isinstance(e, (int, bool)) and not isinstance(e, np.generic) for e in v):
        a = np.asarray(v, dtype=np.int64)
    elif isinstance(v, (list, tuple)) and v and all(isinstance(e, (np.ndarray, np.generic)) for e in v):
        a = np.stack(v)
    else:
        raise TypeError(f"not a tensor: {type(v).__name__}")
    le = np.ascontiguousarray(a, a.dtype.newbyteorder("<"))
    return {
        "dtype": a.dtype.name,
        "shape": list(a.shape),
        "sha256": hashlib.sha256(le.tobytes()).hexdigest(),
    }


def expected_sets(data: bytes):
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy 2 warns on numpy.core
        obj = pickle.loads(data, encoding="latin1")
    assert len(obj) == 3
    sets = []
    for name, (x, y) in zip(NAMES, obj):
        ex, ey = expected_tensor(x), expected_tensor(y)
        assert ex["shape"][0] == ey["shape"][0]
        sets.append({"name": name, "examples": ex["shape"][0], "x": ex, "y": ey})
    return sets


# ---------------------------------------------------------------------------
# accepted variants
# ---------------------------------------------------------------------------

class Out:
    def __init__(self, root: str):
        self.root = root
        self.files = []
        self.hostile = []
        self.npz = []
        self.cifar = []
        self.names = set()

    def _write(self, rel: str, data: bytes):
        assert rel not in self.names, rel
        self.names.add(rel)
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def accept(self, rel: str, data: bytes, description: str, *, also_gz: bool = False):
        self._write(rel, data)
        self.files.append({"file": rel, "description": description, "sets": expected_sets(data)})
        if also_gz:
            self.accept(rel + ".gz", gz(data), description + "; gzip'd")

    def reject(self, rel: str, data: bytes, description: str, *errors: str):
        self._write(rel, data)
        self.hostile.append({"file": rel, "description": description, "error_any": list(errors)})


WRITERS = {
    "np2": (np2, "Python 3 pickle, numpy 2 module names (numpy._core.*)"),
    "np1": (np1, "Python 3 pickle, numpy 1.x module names (numpy.core.*)"),
}


def force_escapes(x: np.ndarray) -> np.ndarray:
    """Puts float32 values whose bytes need every Python 2 repr escape into
    row 0: k/256 for k in 128..255 stores k-128 in byte 2 (k=167 -> 0x27 ',
    162 -> 0x22 ", 138 -> \\n, 137 -> \\t, 141 -> \\r, 220 -> 0x5c \\\\);
    k=100 gives 0xc8 (\\xc8), and zeros give \\x00."""
    x = x.copy()
    ks = [167, 162, 138, 137, 141, 220, 100, 0]
    x[0, : len(ks)] = np.array(ks, dtype=np.float32) / 256
    return x


def accepted(out: Out):
    seed = SEED
    # 1. Python 3 protocols 0-5, numpy 2 and numpy 1.x names, plain and gzip'd.
    for tag, (writer, what) in WRITERS.items():
        for p in range(6):
            seed += 1
            d = dataset(seed, width=784)
            out.accept(f"{tag}-p{p}.pkl", writer(d, p), f"{what}, protocol {p}; x float32 [n, 784]", also_gz=True)

    # 2. Python 2 (hand-written opcodes), protocols 0, 1, 2.
    seed += 1
    d = dataset(seed, width=784)
    d = ((force_escapes(d[0][0]), d[0][1]),) + d[1:]
    for p, who in ((0, "pickle.py, text opcodes"), (1, "pickle.py, binary opcodes"), (2, "cPickle, as mnist.pkl.gz")):
        data = py2(d, p)
        if p == 0:
            for esc in (b"\\x", b"\\n", b"\\t", b"\\r", b"\\\\", b"\\'", b'"'):
                assert esc in data, esc
        out.accept(f"py2-p{p}.pkl", data, f"Python 2 {who}, protocol {p}; x float32 [n, 784]", also_gz=True)
    # every byte value in a protocol 0 STRING (single-quoted: holds ' and ")
    seed += 1
    d = dataset(seed, width=40, xdtype="u1")
    d = (((np.arange(280) % 256).astype(np.uint8).reshape(7, 40), d[0][1]),) + d[1:]
    out.accept("py2-p0-allbytes.pkl", py2(d, 0), "Python 2 pickle.py protocol 0; x uint8 holding every byte value 0-255 (every repr escape)")
    # a payload with ' but no " is double-quoted by Python 2's repr
    seed += 1
    d = dataset(seed, width=16, xdtype="u1")
    fix = lambda a: np.where(a == 0x22, 0x27, a).astype(np.uint8)  # noqa: E731
    d = tuple((fix(x), y) for x, y in d)
    d = ((np.concatenate([np.full((7, 1), 0x27, np.uint8), d[0][0][:, 1:]], axis=1), d[0][1]),) + d[1:]
    assert b"S\"" in py2(d, 0)
    out.accept("py2-p0-dquote.pkl", py2(d, 0), "Python 2 pickle.py protocol 0; payload with ' and no \" (double-quoted STRING)")
    seed += 1
    d = dataset(seed, xdtype=">f4", ydtype=">i8")
    out.accept("py2-p2-bigendian.pkl", py2(d, 2), "Python 2 cPickle protocol 2; x >f4, y >i8 (big-endian)")
    out.accept("py2-p1-bigendian.pkl", py2(d, 1), "Python 2 pickle.py protocol 1; x >f4, y >i8 (big-endian)")
    seed += 1
    d = dataset(seed, width=5)
    d = tuple((np.asfortranarray(x), y) for x, y in d)
    out.accept("py2-p2-fortran.pkl", py2(d, 2), "Python 2 cPickle protocol 2; x Fortran order (is_fortran True)")
    out.accept("py2-p0-fortran.pkl", py2(d, 0), "Python 2 pickle.py protocol 0; x Fortran order (is_fortran True)")
    seed += 1
    d = dataset(seed, width=6)
    d = tuple(([r for r in x], [int(v) for v in y]) for x, y in d)
    out.accept("py2-p2-list.pkl", py2(d, 2), "Python 2 cPickle protocol 2; tutorial list form: x list of 1-D float32 arrays, y list of ints")
    seed += 1
    d = dataset(seed, width=6, xdtype="u1", ydtype="<i8")
    out.accept("py2-p2-uint8.pkl", py2(d, 2), "Python 2 cPickle protocol 2; x uint8 ('|u1')")

    # 3. x dtypes (and label dtypes), at protocol 2 (_reconstruct) and 5 (_frombuffer).
    for dt in ("float32", "float64", "uint8", "int32", "int64", "float16", "int8", "int16", "uint16", "bool"):
        seed += 1
        d = dataset(seed, xdtype=dt)
        for p in (2, 5):
            out.accept(f"dtype-x-{dt}-p{p}.pkl", np2(d, p), f"x {dt}, y int64; protocol {p}")
    for dt in ("int32", "uint8"):
        seed += 1
        d = dataset(seed, ydtype=dt)
        for p in (2, 5):
            out.accept(f"dtype-y-{dt}-p{p}.pkl", np2(d, p), f"x float32, y {dt}; protocol {p}")

    # 4. big-endian arrays.
    seed += 1
    d = dataset(seed, xdtype=">f4", ydtype=">i8")
    for p in (0, 2, 4, 5):
        out.accept(f"bigendian-p{p}.pkl", np2(d, p), f"x >f4, y >i8 (big-endian); protocol {p}")
    out.accept("bigendian-np1-p2.pkl.gz", gz(np1(d, 2)), "x >f4, y >i8 (big-endian); numpy 1.x names, protocol 2, gzip'd")
    for dt in (">f8", ">i4", ">f2", ">u2", ">i2"):
        seed += 1
        d2 = dataset(seed, xdtype=dt)
        out.accept(f"bigendian-x-{np.dtype(dt).name}-p4.pkl", np2(d2, 4), f"x {dt} (big-endian); protocol 4")
    # one big-endian pair object used for train and test: memo reference, swapped once
    seed += 1
    d = dataset(seed, xdtype=">f4", ydtype=">i8")
    shared = (d[0], d[1], d[0])
    for p in (2, 5):
        out.accept(f"bigendian-shared-p{p}.pkl", np2(shared, p), f"big-endian; test is the same (x, y) pair object as train (memo reference); protocol {p}")
    out.accept("bigendian-shared-py2-p2.pkl", py2(shared, 2), "big-endian; test is the same (x, y) pair as train (BINGET); Python 2 cPickle protocol 2")

    # 5. Fortran order.
    seed += 1
    d = dataset(seed, width=5)
    df = tuple((np.asfortranarray(x), y) for x, y in d)
    for p in (0, 2, 4, 5):
        out.accept(f"fortran-p{p}.pkl", np2(df, p), f"x Fortran order (np.asfortranarray, 2-D); protocol {p}")
    seed += 1
    d = dataset(seed, row_shape=(2, 3))
    df = tuple((np.asfortranarray(x), y) for x, y in d)
    for p in (2, 5):
        out.accept(f"fortran-3d-p{p}.pkl", np2(df, p), f"x Fortran order, 3-D [n, 2, 3]; protocol {p}")
    seed += 1
    d = dataset(seed, width=5, xdtype=">f8")
    df = tuple((np.asfortranarray(x), y) for x, y in d)
    out.accept("fortran-bigendian-p5.pkl", np2(df, 5), "x Fortran order and big-endian (>f8); protocol 5")

    # 6. The tutorial's list form.
    seed += 1
    d = dataset(seed, width=784)
    dl = tuple(([r for r in x], [int(v) for v in y]) for x, y in d)
    for p in (0, 2, 4, 5):
        out.accept(f"list-p{p}.pkl", np2(dl, p), f"list form: x list of 1-D float32 arrays [784], y list of Python ints; protocol {p}")
    out.accept("list-np1-p2.pkl", np1(dl, 2), "list form; numpy 1.x names, protocol 2")
    seed += 1
    d = dataset(seed, width=6)
    ds = tuple(([r for r in x], [np.int64(v) for v in y]) for x, y in d)
    for p in (2, 4):
        out.accept(f"list-npscalar-p{p}.pkl", np2(ds, p), f"list form: x list of arrays, y list of numpy.int64 scalars; protocol {p}")
    out.accept("list-npscalar-np1-p2.pkl", np1(ds, 2), "list form with numpy.int64 scalar labels; numpy 1.x names (numpy.core.multiarray.scalar), protocol 2")
    seed += 1
    d = dataset(seed, width=6, xdtype=">f4")
    dl = tuple(([r for r in x], [int(v) for v in y]) for x, y in d)
    out.accept("list-bigendian-p4.pkl", np2(dl, 4), "list form with big-endian (>f4) rows; protocol 4")

    # 7. Layout details.
    seed += 1
    d = dataset(seed)
    out.accept("layout-lists-p4.pkl", np2([list(p) for p in d], 4), "top level and pairs are lists, not tuples; protocol 4")
    seed += 1
    d = dataset(seed, row_shape=(4, 7))
    out.accept("x-3d-p4.pkl", np2(d, 4), "x 3-D [n, 4, 7]; protocol 4")
    seed += 1
    d = dataset(seed)
    out.accept("shared-pair-p2.pkl", np2((d[0], d[1], d[1]), 2), "valid and test are the same (x, y) pair object (memo reference); protocol 2")
    seed += 1
    d = dataset(seed, sizes=(1, 1, 1))
    out.accept("one-example-p2.pkl", np2(d, 2), "one example per set; protocol 2")


# ---------------------------------------------------------------------------
# hostile files
# ---------------------------------------------------------------------------

# Tiny files built to burn CPU: opcodes written by hand (as in
# tests/fuzz_loader.rs, which checks the same streams in work units). Each
# compresses to about 1.5 kB and once took minutes of CPU to reject.

DTYPE_STATE = b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
RECONSTRUCT = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"


def build_state_bomb(width: int, builds: int) -> bytes:
    """numpy.dtype('f4') whose state tuple is padded (DUP) to `width` items,
    memoized, then BUILT onto the dtype `builds` more times through BINGET:
    3 bytes per BUILD, each of which once copied the whole tuple."""
    return (b"\x80\x02cnumpy\ndtype\nq\x00U\x02f4\x89\x88\x87Rq\x01"
            b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00" + b"2" * (width - 8)
            + b"tq\x02b" + b"h\x02b" * builds + b".")


def shape_bomb(dims: int, builds: int) -> bytes:
    """An empty array whose memoized state (1, shape, dtype, False, b'')
    nests a shape of `dims` 1s, BUILT `builds + 1` times: each BUILD once
    copied and converted the whole shape."""
    return (b"\x80\x02" + RECONSTRUCT + b"(K\x01(K\x01" + b"2" * (dims - 1)
            + b"tcnumpy\ndtype\nU\x02u1\x89\x88\x87R" + DTYPE_STATE
            + b"b\x89U\x00tq\x00b" + b"h\x00b" * builds + b".")


def fortran_dims(dims: int, n: int) -> bytes:
    """((x, None), (x, None), (x, None)) where x is a Fortran-order uint8
    array of shape (1,) * (dims - 1) + (n,), through numpy's _reconstruct +
    BUILD: transposing it once cost n * dims steps."""
    return (b"\x80\x02" + RECONSTRUCT + b"(K\x01(K\x01" + b"2" * (dims - 2)
            + b"M" + n.to_bytes(2, "little") + b"tcnumpy\ndtype\nU\x02u1\x89\x88\x87R"
            + DTYPE_STATE + b"b\x88T" + n.to_bytes(4, "little") + bytes(i % 256 for i in range(n))
            + b"tbN\x86q\x00h\x00h\x00\x87.")


def set_copies(width: int, calls: int) -> bytes:
    """set(l) called `calls` times on one memoized list of `width` ints:
    each 6-byte REDUCE copies the whole list, under the memory cap; only
    the loader's work budget stops it."""
    return (b"\x80\x02c__builtin__\nset\nq\x000(K\x00" + b"2" * (width - 1)
            + b"l\x85q\x010" + b"h\x00h\x01R0" * calls + b"N.")


def hostile(out: Out):
    good = dataset(SEED + 1000, width=8)
    good_py2 = py2(good, 2)
    good_gz = gz(good_py2)
    h = "hostile/"

    out.reject(h + "os-system.pkl", b"cos\nsystem\n(S'echo pwned'\ntR.",
               "protocol 0 GLOBAL os.system + REDUCE", "refusing global os.system")
    out.reject(h + "builtins-eval.pkl",
               b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94"
               b"\x8c\x0dprint('pwned')\x94\x85\x94R\x94.",
               "protocol 4 STACK_GLOBAL builtins.eval + REDUCE", "refusing global builtins.eval")
    out.reject(h + "reduce-class.pkl",
               pickle.dumps(__import__("collections").OrderedDict(a=1), protocol=2),
               "REDUCE of a class (collections.OrderedDict)", "refusing global", "not allowed")
    out.reject(h + "newobj.pkl", b"\x80\x02cnumpy\ndtype\nq\x00)\x81q\x01.",
               "NEWOBJ of an allowed class (numpy.dtype)", "not allowed", "refusing global")
    out.reject(h + "inst.pkl", b"(S'f4'\ninumpy\ndtype\np0\n.",
               "protocol 0 INST (numpy.dtype)", "not allowed", "refusing global")
    out.reject(h + "obj.pkl", b"\x80\x01(cnumpy\ndtype\nU\x02f4o.",
               "protocol 1 OBJ (numpy.dtype)", "not allowed", "refusing global")

    cut = len(good_gz) * 3 // 5
    out.reject(h + "truncated.pkl.gz", good_gz[:cut],
               f"gzip cut at byte {cut} of {len(good_gz)} (in the deflate data)", "ends early", "truncated")
    out.reject(h + "truncated-trailer.pkl.gz", good_gz[:-5],
               "gzip missing the last 5 bytes of its trailer", "ends early", "truncated")
    bad = bytearray(good_gz)
    bad[-8] ^= 0xFF
    out.reject(h + "bad-crc.pkl.gz", bytes(bad), "gzip CRC-32 trailer with one byte flipped", "CRC-32 mismatch")
    out.reject(h + "trailing-garbage.pkl.gz", good_gz + b"garbage after the member\n",
               "bytes after the gzip member", "trailing garbage")
    out.reject(h + "not-a-pickle.pkl", b"<!-- this is not a pickle, just text -->\nhello\n",
               "random text", "unknown opcode")

    two = dataset(SEED + 1001, sizes=(7, 3))
    out.reject(h + "two-pairs.pkl", np2(two, 2), "top level is a tuple of 2 pairs", "expected a tuple of 3")
    mm = list(dataset(SEED + 1002))
    mm[1] = (mm[1][0], np.concatenate([mm[1][1], mm[1][1][:1]]))
    out.reject(h + "xy-mismatch.pkl", np2(tuple(mm), 2), "valid: x has 3 examples, y has 4", "examples but y has")
    x0 = good[0][0]
    short = py2pickle.RawArray(x0.shape, x0.dtype, x0.tobytes()[:-4])
    out.reject(h + "payload-short.pkl", py2(((short, good[0][1]),) + good[1:], 2),
               "train x: BINSTRING 4 bytes shorter than its shape needs", "payload holds")
    out.reject(h + "huge-length.pkl", b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"abc.",
               "BINBYTES8 declaring 2**62 bytes", "remain")

    row = np.zeros(784, dtype=np.float32)
    bomb = (([row] * 100_000, [0] * 100_000),) + dataset(SEED + 1003)[1:]
    data = np2(bomb, 2)
    assert data.count(b"h") >= 100_000
    out.reject(h + "memo-bomb.pkl.gz", gz(data),
               "train x: list of 100,000 BINGET references to one [784] float32 array (313 MB if stacked)",
               "more than the whole input holds")
    out.reject(h + "deep-marks.pkl", b"\x80\x02" + b"(" * 1000 + b"N" + b"t" * 1000 + b".",
               "1000 nested MARKs", "nested MARKs")
    out.reject(h + "no-stop.pkl", good_py2[:-1], "valid dataset without its STOP opcode", "without a STOP")

    obj = list(dataset(SEED + 1004))
    obj[0] = (np.array(obj[0][0].tolist(), dtype=object), obj[0][1])
    out.reject(h + "object-array.pkl", np2(tuple(obj), 2), "train x has dtype=object", "dtype=object")
    st = list(dataset(SEED + 1005))
    sx = np.zeros(7, dtype=[("a", "<f4"), ("b", "<i4")])
    st[0] = (sx, st[0][1])
    out.reject(h + "structured.pkl", np2(tuple(st), 2), "train x has a structured dtype [('a', f4), ('b', i4)]", "structured")
    buffers = []
    # a buffer_callback returning False makes every buffer out-of-band
    nb = pickle.dumps(dataset(SEED + 1006), protocol=5, buffer_callback=lambda b: buffers.append(b) or False)
    assert b"\x97" in nb and buffers
    out.reject(h + "next-buffer.pkl", nb, "protocol 5 with out-of-band buffers (NEXT_BUFFER)", "not allowed")

    # CPU bombs: the errors come after work linear in the decompressed size.
    out.reject(h + "build-state-bomb.pkl.gz", gz(build_state_bomb(1_000_000, 100_000)),
               "100,000 BUILDs of one memoized 1,000,008-item numpy.dtype state (BINGET); the root is that dtype",
               "found numpy dtype")
    out.reject(h + "shape-bomb.pkl.gz", gz(shape_bomb(1_000_000, 100_000)),
               "100,000 BUILDs of one memoized array state nesting a shape of 1,000,000 dimensions",
               "1000000 dimensions, more than numpy's limit of 64")
    out.reject(h + "fortran-dims.pkl.gz", gz(fortran_dims(1_000_000, 2000)),
               "train x: Fortran-order uint8 array (_reconstruct + BUILD) of shape (1,) * 999,999 + (2000,)",
               "1000000 dimensions, more than numpy's limit of 64")
    out.reject(h + "set-copies.pkl.gz", gz(set_copies(10_000, 400)),
               "set(l) 400 times on one memoized list of 10,000 ints (4M values copied from 12 kB)",
               "work budget")


# ---------------------------------------------------------------------------
# .npz (Keras mnist.npz layout)
# ---------------------------------------------------------------------------

def npz_arrays(seed, n_train=12, n_test=4, row=(28, 28), xdtype=np.uint8, ydtype=np.uint8):
    rng = np.random.default_rng(seed)
    def x(n):
        if np.dtype(xdtype).kind == "f":
            return (rng.integers(0, 256, (n, *row)) / 256).astype(xdtype)
        return rng.integers(0, 256, (n, *row)).astype(xdtype)
    return {
        "x_train": x(n_train), "y_train": rng.integers(0, 10, n_train).astype(ydtype),
        "x_test": x(n_test), "y_test": rng.integers(0, 10, n_test).astype(ydtype),
    }


def npz_bytes(arrays, compressed: bool) -> bytes:
    f = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return f.getvalue()


def served_x(x: np.ndarray) -> np.ndarray:
    """x as the daemon serves an IDX or .npy array (src/load/mod.rs
    examples_shape): [n, H, W] flattened to [n, H*W] (MNIST's row of 784),
    1-D to [n, 1], examples with channels ([n, C, H, W], [n, H, W, C]) kept."""
    return x.reshape(len(x), -1) if x.ndim <= 3 else x


def expected_npz_sets(data: bytes, valid_split: int):
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        a = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    def xs(x):
        return served_x(x)
    def ys(y):
        return y.astype(np.int64) if y.dtype in (np.uint8, np.int8) else y
    cut = len(a["x_train"]) - valid_split
    parts = [("train", a["x_train"][:cut], a["y_train"][:cut])]
    if valid_split:
        parts.append(("valid", a["x_train"][cut:], a["y_train"][cut:]))
    parts.append(("test", a["x_test"], a["y_test"]))
    return [{"name": n, "examples": len(y), "x": expected_tensor(xs(x)), "y": expected_tensor(ys(y))}
            for n, x, y in parts]


def patch_central_size(data: bytes, member: str, size: int) -> bytes:
    """Sets a member's uncompressed size in the central directory."""
    b = bytearray(data)
    p = bytes(b).find(b"PK\x01\x02")
    while p >= 0:
        n = int.from_bytes(b[p + 28:p + 30], "little")
        if bytes(b[p + 46:p + 46 + n]) == member.encode():
            b[p + 24:p + 28] = size.to_bytes(4, "little")
            return bytes(b)
        p = bytes(b).find(b"PK\x01\x02", p + 4)
    raise KeyError(member)


def npz(out: Out):
    def accept(rel, data, description, valid_split):
        out._write(rel, data)
        out.npz.append({"file": rel, "format": "npz", "description": description, "valid_split": valid_split,
                        "sets": expected_npz_sets(data, valid_split)})
    mnist = npz_arrays(SEED)
    accept("npz/mnist-savez.npz", npz_bytes(mnist, False),
           "mnist.npz layout: uint8 [n, 28, 28] images, uint8 labels, np.savez (stored)", 3)
    accept("npz/mnist-compressed.npz", npz_bytes(mnist, True),
           "mnist.npz layout, np.savez_compressed (deflated)", 3)
    accept("npz/mnist-no-valid.npz", npz_bytes(mnist, True), "no validation set (--valid-split 0)", 0)
    accept("npz/float-bigendian.npz",
           npz_bytes(npz_arrays(SEED + 1, row=(3, 4), xdtype=">f4", ydtype=">i8"), True),
           "big-endian float32 [n, 3, 4] images and int64 labels", 2)
    accept("npz/int8-labels.npz", npz_bytes(npz_arrays(SEED + 2, row=(5,), ydtype=np.int8), False),
           "1-D rows and int8 labels", 2)
    # the same arrays as np.save'd files in a directory
    arrays = npz_arrays(SEED + 4, row=(2, 3), xdtype="<f8", ydtype=">i2")
    for k, v in arrays.items():
        out._write(f"npy-dir/{k}.npy", _npy(v))
    out.npz.append({"file": "npy-dir", "format": "npy", "valid_split": 5,
                    "description": "a directory of x_train.npy, y_train.npy, x_test.npy, y_test.npy (np.save)",
                    "sets": expected_npz_sets(npz_bytes(arrays, False), 5)})
    h = "hostile/"
    base = npz_arrays(SEED + 3)
    obj = dict(base, y_train=np.array([1, "a"] * 6, dtype=object))
    f = io.BytesIO()
    np.savez(f, allow_pickle=True, **obj)
    out.reject(h + "object-dtype.npz", f.getvalue(), "y_train is an object array (pickled)", "object arrays")
    # x_test's header says 5 images instead of 4 (same header length)
    lying = {k + ".npy": _npy(v) for k, v in base.items()}
    lying["x_test.npy"] = lying["x_test.npy"].replace(b"'shape': (4, 28, 28)", b"'shape': (5, 28, 28)", 1)
    assert b"(5, 28, 28)" in lying["x_test.npy"]
    out.reject(h + "lying-shape.npz", _zip(lying), ".npy header claims more data than the member holds",
               "needs 3920 bytes of data, the member holds 3136")
    other = dict(base, x_test=np.zeros((len(base["x_test"]), 30, 30), np.uint8))
    out.reject(h + "mismatched-shapes.npz", npz_bytes(other, False), "x_test of 30x30 images, x_train of 28x28",
               "examples of uint8 [900], the training examples are uint8 [784]")
    fortran = dict(base, x_train=np.asfortranarray(base["x_train"]))
    out.reject(h + "fortran.npz", npz_bytes(fortran, False), "Fortran-order x_train", "fortran_order")
    bomb = npz_bytes(dict(base, x_train=np.zeros((2000, 28, 28), np.uint8)), True)
    out.reject(h + "bomb.npz", patch_central_size(bomb, "x_train.npy", 4096),
               "x_train declares 4096 bytes in the central directory and inflates to 1.5 MB",
               "inflates to more than the 4096 bytes")
    whole = npz_bytes(base, True)
    out.reject(h + "truncated.npz", whole[: len(whole) // 2], "an npz cut in half",
               "end-of-central-directory")
    members = {k + ".npy": _npy(v) for k, v in base.items()}
    members["y_test.npy"] = b"not an npy array at all"
    out.reject(h + "not-npy-member.npz", _zip(members), "y_test.npy is not a .npy array", ".npy magic")
    f = io.BytesIO()
    np.savez(f, images=base["x_train"], labels=base["y_train"])
    out.reject(h + "other-keys.npz", f.getvalue(), "keys other than Keras's", "no member x_train.npy")


# ---------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100, python version (tar.gz as downloaded, extracted folders)
# ---------------------------------------------------------------------------

# The member order of the real cifar-10-python.tar.gz (not sorted: data_batch_4
# first, data_batch_1 last), and of cifar-100-python.tar.gz.
CIFAR10_MEMBERS = ("data_batch_4", "readme.html", "test_batch", "data_batch_3",
                   "batches.meta", "data_batch_2", "data_batch_5", "data_batch_1")
CIFAR100_MEMBERS = ("file.txt~", "train", "test", "meta")


class CPickleDictWriter(py2pickle._Writer):
    """py2pickle's cPickle (protocol 2) writer plus dicts, as Python 2's
    cPickle wrote CIFAR's batches: EMPTY_DICT and BINPUT (the dict handed to
    dump has a second reference), then MARK, key/value pairs, SETITEMS
    (batches of 1,000); keys are interned str, so SHORT_BINSTRING + BINPUT;
    the values as py2pickle writes them (labels: EMPTY_LIST, BINPUT, MARK,
    BININT1/BININT2..., APPENDS; data: _reconstruct + BINSTRING)."""

    def save(self, obj):
        if isinstance(obj, dict):
            self.out += b"}"
            self.put(("obj", id(obj)))
            self._keep.append(obj)
            items = list(obj.items())
            for start in range(0, len(items), 1000):
                chunk = items[start:start + 1000]
                if len(chunk) > 1:
                    self.out += b"("
                for k, v in chunk:
                    assert isinstance(k, bytes) and len(k) < 256
                    self.out += b"U" + bytes([len(k)]) + k
                    self.put(None)
                    self.save(v)
                self.out += b"u" if len(chunk) > 1 else b"s"
        else:
            super().save(obj)


def py2_dict(d: dict) -> bytes:
    w = CPickleDictWriter(2)
    w.out += b"\x80\x02"
    w.save(d)
    w.out += b"."
    return bytes(w.out)


def cifar_images(rng, n: int) -> np.ndarray:
    """n images [n, 3072] uint8 (CHW rows): coarse 8 x 8 noise blown up 4x,
    so gzip has something to find, as in real photos."""
    small = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
    return np.ascontiguousarray(small.repeat(4, axis=2).repeat(4, axis=3).reshape(n, 3072))


def cifar_batches(seed: int, kind: str, rows: dict) -> dict:
    """The batches of CIFAR-10 (`kind` "10") or CIFAR-100 ("100") as Python
    2 dicts with str (bytes) keys in the originals' key order, `rows` per
    batch name."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in rows.items():
        data = cifar_images(rng, n)
        files = [b"img_%s_%05d.png" % (name.encode(), i) for i in range(n)]
        label = b"%s batch" % name.encode()
        if kind == "10":
            out[name] = {b"batch_label": label, b"labels": [int(v) for v in rng.integers(0, 10, n)],
                         b"data": data, b"filenames": files}
        else:
            out[name] = {b"filenames": files, b"batch_label": label,
                         b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                         b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)], b"data": data}
    return out


def repickle(d: dict, protocol: int, *, keys: str, names: str = "np2") -> bytes:
    """A Python 2 batch as a Python 3 user re-pickles it: read back with
    pickle.load(encoding='latin1') (str keys) or encoding='bytes' (bytes
    keys), dumped at `protocol` with numpy 2 or numpy 1.x module names."""
    obj = pickle.loads(py2_dict(d), encoding="latin1" if keys == "str" else "bytes")
    return (np2 if names == "np2" else np1)(obj, protocol)


def tar_bytes(folder: str, members: dict, fmt=None, compress: bool = True, order=None, pax: bool = False) -> bytes:
    """A tar (gzip'd) of `folder`/ and its members, in `order`, written by
    Python's tarfile in format `fmt`; `pax`: per-member pax headers and a
    global one, as re-packing tools write."""
    import tarfile
    fmt = tarfile.GNU_FORMAT if fmt is None else fmt
    f = io.BytesIO()
    kw = {"pax_headers": {"comment": "minibatchd fixture"}} if pax else {}
    with tarfile.open(fileobj=f, mode="w", format=fmt, **kw) as t:
        d = tarfile.TarInfo(folder)
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1234567890
        t.addfile(d)
        for name in order or members:
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size, info.mode, info.mtime = len(members[name]), 0o644, 1234567890
            if pax:
                info.pax_headers = {"path": info.name}
            t.addfile(info, io.BytesIO(members[name]))
    return gz(f.getvalue()) if compress else f.getvalue()


def expected_cifar(members: dict, kind: str, valid: int = 0):
    """The sets, from Python's own unpickler (torchvision's way:
    pickle.load(f, encoding='latin1') per batch, np.vstack, reshape to
    [n, 3, 32, 32]); labels as int64. `valid`: the last rows of train
    become set `valid` (--valid-split)."""
    def load(name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = pickle.loads(members[name], encoding="latin1")
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if kind == "10":
        train = [load(f"data_batch_{i}") for i in range(1, 6)]
        test = [load("test_batch")]
        keys = [("", "labels")]
    else:
        train, test = [load("train")], [load("test")]
        keys = [("", "fine_labels"), ("_coarse", "coarse_labels")]
    sets = []
    for suffix, key in keys:
        parts = []
        for name, batches in (("train", train), ("test", test)):
            x = np.vstack([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
            y = np.concatenate([np.asarray(b[key], dtype=np.int64) for b in batches])
            if name == "train" and valid:
                parts += [("train", x[:-valid], y[:-valid]), ("valid", x[-valid:], y[-valid:])]
            else:
                parts.append((name, x, y))
        for name, x, y in parts:
            sets.append({"name": name + suffix, "examples": len(y), "x": expected_tensor(x), "y": expected_tensor(y)})
    return sets


def cifar(out: Out):
    import tarfile

    def accept(rel, data, description, members, kind):
        if data is not None:
            out._write(rel, data)
        out.cifar.append({"file": rel, "format": f"cifar-{kind}", "description": description,
                          "sets": expected_cifar(members, kind),
                          "sets_valid_3": expected_cifar(members, kind, valid=3)})

    def folder(rel, members):
        for name, data in members.items():
            out._write(f"{rel}/{name}", data)

    rows10 = {f"data_batch_{i}": 100 for i in range(1, 6)} | {"test_batch": 100}
    b10 = cifar_batches(SEED + 10, "10", rows10)
    extra10 = {"readme.html": b"<html>CIFAR-10 fixture</html>\n",
               "batches.meta": py2_dict({b"label_names": [b"airplane", b"automobile"], b"num_cases_per_batch": 100,
                                         b"num_vis": 3072})}
    py2m = {k: py2_dict(v) for k, v in b10.items()} | extra10
    first = py2m["data_batch_1"]
    assert first.startswith(b"\x80\x02}q\x01(U\x0bbatch_labelq\x02U\x12data_batch_1 batchU\x06labelsq\x03]q\x04(K")
    accept("cifar/cifar-10-python.tar.gz", tar_bytes("cifar-10-batches-py", py2m, order=CIFAR10_MEMBERS),
           "CIFAR-10 as downloaded: Python 2 cPickle batches (100 rows each), GNU tar in the real member order, gzip'd",
           py2m, "10")
    folder("cifar/extracted-10/cifar-10-batches-py", py2m)
    accept("cifar/extracted-10", None, "the same, extracted: the top folder", py2m, "10")
    accept("cifar/extracted-10/cifar-10-batches-py", None, "the same, extracted: the batches folder", py2m, "10")

    small = {f"data_batch_{i}": 7 + i for i in range(1, 6)} | {"test_batch": 5}
    s10 = cifar_batches(SEED + 11, "10", small)
    for proto, keys, names, fmt, pax in ((2, "str", "np2", tarfile.PAX_FORMAT, True),
                                         (3, "bytes", "np2", tarfile.USTAR_FORMAT, False),
                                         (4, "str", "np1", tarfile.GNU_FORMAT, False),
                                         (5, "str", "np2", tarfile.PAX_FORMAT, False),
                                         (2, "bytes", "np1", tarfile.GNU_FORMAT, False)):
        m = {k: repickle(v, proto, keys=keys, names=names) for k, v in s10.items()} | extra10
        fname = {tarfile.PAX_FORMAT: "pax", tarfile.USTAR_FORMAT: "ustar", tarfile.GNU_FORMAT: "gnu"}[fmt]
        accept(f"cifar/py3-p{proto}-{keys}-{names}-{fname}.tar.gz",
               tar_bytes("cifar-10-batches-py", m, fmt=fmt, pax=pax),
               f"CIFAR-10 re-pickled by Python 3 (protocol {proto}, {keys} keys, {names} names), {fname} tar"
               + (" with pax headers" if pax else ""), m, "10")
    m = {k: py2_dict(v) for k, v in s10.items()} | extra10
    accept("cifar/plain.tar", tar_bytes("cifar-10-batches-py", m, compress=False),
           "CIFAR-10, Python 2 batches, tar not gzip'd", m, "10")

    rows100 = {"train": 120, "test": 40}
    b100 = cifar_batches(SEED + 12, "100", rows100)
    m100 = {k: py2_dict(v) for k, v in b100.items()} | {
        "meta": py2_dict({b"fine_label_names": [b"apple"], b"coarse_label_names": [b"fruit"]}),
        "file.txt~": b"fixture\n"}
    accept("cifar/cifar-100-python.tar.gz", tar_bytes("cifar-100-python", m100, order=CIFAR100_MEMBERS),
           "CIFAR-100 as downloaded: Python 2 cPickle train/test (fine and coarse labels), GNU tar, gzip'd", m100, "100")
    folder("cifar/extracted-100/cifar-100-python", m100)
    accept("cifar/extracted-100", None, "the same, extracted: the top folder", m100, "100")
    m = {k: repickle(v, 4, keys="bytes") for k, v in b100.items()} | {"meta": m100["meta"]}
    accept("cifar/cifar-100-py3-p4.tar.gz", tar_bytes("cifar-100-python", m, fmt=tarfile.PAX_FORMAT, pax=True),
           "CIFAR-100 re-pickled by Python 3 (protocol 4, bytes keys), pax tar", m, "100")

    # hostile archives and batches
    h = "hostile/cifar-"
    good = {k: py2_dict(v) for k, v in cifar_batches(SEED + 13, "10", {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 2}).items()}

    def with_member(info_kw: dict) -> bytes:
        f = io.BytesIO()
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as t:
            for name in good:
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(good[name])
                t.addfile(info, io.BytesIO(good[name]))
            info = tarfile.TarInfo(info_kw.pop("name", "cifar-10-batches-py/evil"))
            for k, v in info_kw.items():
                setattr(info, k, v)
            t.addfile(info)
        return gz(f.getvalue())

    out.reject(h + "symlink.tar.gz", with_member({"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
               "a symlink member to /etc/passwd", "is a symbolic link to /etc/passwd")
    out.reject(h + "hardlink.tar.gz", with_member({"type": tarfile.LNKTYPE, "linkname": "/etc/shadow"}),
               "a hard link member", "is a hard link to /etc/shadow")
    out.reject(h + "device.tar.gz", with_member({"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}),
               "a character device member (/dev/null's numbers)", "is a character device")
    out.reject(h + "fifo.tar.gz", with_member({"type": tarfile.FIFOTYPE}), "a fifo member", "is a fifo")
    out.reject(h + "dotdot.tar.gz", with_member({"name": "cifar-10-batches-py/../../../etc/cron.d/x"}),
               "a member path with '..' components", "'..' component")
    out.reject(h + "absolute.tar.gz", with_member({"name": "/etc/cron.d/x"}), "an absolute member path", "absolute path")

    whole = tar_bytes("cifar-10-batches-py", good, compress=False)
    hdr = whole.find(b"cifar-10-batches-py/data_batch_2")
    assert hdr % 512 == 0

    def set_size(t: bytes, at: int, size: int) -> bytes:
        b = bytearray(t)
        b[at + 124:at + 136] = b"%011o\0" % size
        b[at + 148:at + 156] = b" " * 8
        b[at + 148:at + 156] = b"%06o\0 " % sum(b[at:at + 512])
        return bytes(b)

    out.reject(h + "size-past-end.tar.gz", gz(set_size(whole, hdr, 10**9)),
               "data_batch_2's size field says 1e9 bytes", "a size field that lies")
    out.reject(h + "size-short.tar.gz", gz(set_size(whole, hdr, 1000)),
               "data_batch_2's size field says 1000 bytes: the next header is not where it says",
               "checksum mismatch after member cifar-10-batches-py/data_batch_2")
    out.reject(h + "truncated-tar.tar.gz", gz(whole[:hdr + 512 + 3000]),
               "a tar cut inside data_batch_2 (complete gzip)", "truncated, or a size field that lies")
    cut = tar_bytes("cifar-10-batches-py", good)
    out.reject(h + "truncated-gzip.tar.gz", cut[:len(cut) // 2], "a tar.gz cut in half", "ends early", "truncated")

    def batch_variant(name, change, description, *errors):
        d = cifar_batches(SEED + 13, "10", {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 2})
        change(d)
        m = {k: py2_dict(v) for k, v in d.items()}
        out.reject(h + name, tar_bytes("cifar-10-batches-py", m), description, *errors)

    batch_variant("rows-mismatch.tar.gz", lambda d: d["data_batch_3"][b"labels"].append(1),
                  "data_batch_3: 3 labels for 2 images", "labels: 3 labels for 2 images")
    batch_variant("label-range.tar.gz", lambda d: d["data_batch_2"][b"labels"].__setitem__(1, 10),
                  "a CIFAR-10 label of 10", "outside the 10 classes")
    batch_variant("label-huge.tar.gz", lambda d: d["test_batch"][b"labels"].__setitem__(0, -(2**31)),
                  "a label of -2**31", "outside the 10 classes")
    batch_variant("label-2e70.tar.gz", lambda d: d["data_batch_1"][b"labels"].__setitem__(0, 2**70),
                  "a label of 2**70 (beyond 64 bits)", "is not a 64-bit integer")
    batch_variant("payload-short.tar.gz",
                  lambda d: d["data_batch_2"].__setitem__(b"data", py2pickle.RawArray((2, 3072), np.uint8, bytes(3072))),
                  "data's shape says 2 rows, its BINSTRING holds 1", "needs 6144 bytes, the payload holds 3072")
    batch_variant("label-str.tar.gz", lambda d: d["test_batch"][b"labels"].__setitem__(0, b"cat"),
                  "a label that is a str", "expected an int")
    batch_variant("data-shape.tar.gz",
                  lambda d: d["data_batch_1"].__setitem__(b"data", d["data_batch_1"][b"data"].reshape(2, 32, 32, 3)),
                  "data in HWC shape [n, 32, 32, 3]", "expected (n, 3072)")
    batch_variant("data-float.tar.gz",
                  lambda d: d["data_batch_1"].__setitem__(b"data", d["data_batch_1"][b"data"].astype(np.float32)),
                  "data as float32", "expected uint8 pixels")
    batch_variant("no-labels.tar.gz", lambda d: d["data_batch_5"].pop(b"labels"),
                  "a batch without labels", 'no key "labels"')
    evil = {k: py2_dict(v) for k, v in cifar_batches(SEED + 13, "10", {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 2}).items()}
    # a batch dict whose batch_label is os.system('echo pwned'), cPickle style
    evil["data_batch_4"] = evil["data_batch_4"].replace(
        b"U\x0bbatch_labelq\x02U\x12data_batch_4 batch",
        b"U\x0bbatch_labelq\x02cos\nsystem\nU\x0aecho pwned\x85R", 1)
    assert b"cos\nsystem" in evil["data_batch_4"]
    out.reject(h + "os-system.tar.gz", tar_bytes("cifar-10-batches-py", evil),
               "data_batch_4's batch_label is os.system('echo pwned')", "refusing global os.system")
    out.reject(h + "not-cifar.tar.gz", tar_bytes("stuff", {"a.txt": b"hello"}), "a tar.gz of something else",
               "not CIFAR's python version")


def npz_gz_and_idx(out: Out):
    """Gzip'd .npz, .npz / .npy directories with a given validation pair,
    and IDX directories of other datasets in their exact file layout."""
    def accept(rel, data, fmt, description, valid_split, sets):
        if data is not None:
            out._write(rel, data)
        out.npz.append({"file": rel, "format": fmt, "description": description, "valid_split": valid_split,
                        "sets": sets})
    mnist = npz_bytes(npz_arrays(SEED + 20), True)
    accept("npz/mnist.npz.gz", gz(mnist), "npz", "an np.savez_compressed archive, gzip'd", 3,
           expected_npz_sets(mnist, 3))
    stored = npz_bytes(npz_arrays(SEED + 21), False)
    accept("npz/stored.npz.gz", gz(stored), "npz", "an np.savez archive (stored members), gzip'd", 0,
           expected_npz_sets(stored, 0))
    arrays = npz_arrays(SEED + 22) | {"x_valid": npz_arrays(SEED + 23, n_train=5)["x_train"],
                                       "y_valid": np.arange(5, dtype=np.uint8)}
    with_valid = npz_bytes(arrays, True)
    want = expected_npz_sets(npz_bytes({k: arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")}, False), 0)
    valid = {"name": "valid", "examples": 5, "x": expected_tensor(arrays["x_valid"].reshape(5, -1)),
             "y": expected_tensor(arrays["y_valid"].astype(np.int64))}
    want = [want[0], valid, want[1]]
    accept("npz/with-valid.npz", with_valid, "npz", "x_valid / y_valid given: the valid set, no split", 3, want)
    for k, v in arrays.items():
        out._write(f"npz/with-valid-dir/{k}.npy", _npy(v))
    accept("npz/with-valid-dir", None, "npy", "a .npy directory with x_valid / y_valid", 3, want)

    def idx_file(a: np.ndarray) -> bytes:
        code = {np.uint8: 8, np.int8: 9, np.int16: 0x0b, np.int32: 0x0c, np.float32: 0x0d, np.float64: 0x0e}[a.dtype.type]
        hdr = bytes([0, 0, code, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
        return hdr + a.astype(a.dtype.newbyteorder(">")).tobytes()

    def idx_dir(rel, x_train, y_train, x_test, y_test, names, zipped, description, valid_split):
        for name, a in zip(names, (x_train, y_train, x_test, y_test)):
            data = idx_file(a)
            out._write(f"{rel}/{name}" + (".gz" if zipped else ""), gz(data) if zipped else data)
        cut = len(x_train) - valid_split
        parts = [("train", x_train[:cut], y_train[:cut])]
        if valid_split:
            parts.append(("valid", x_train[cut:], y_train[cut:]))
        parts.append(("test", x_test, y_test))
        sets = [{"name": n, "examples": len(y), "x": expected_tensor(served_x(x)),
                 "y": expected_tensor(y.astype(np.int64))}
                for n, x, y in parts]
        accept(rel, None, "idx", description, valid_split, sets)

    mnist_names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    rng = np.random.default_rng(SEED + 24)
    a = [rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), rng.integers(0, 10, 12, dtype=np.uint8),
         rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), rng.integers(0, 10, 4, dtype=np.uint8)]
    idx_dir("idx/fashion-mnist", *a, mnist_names, True,
            "Fashion-MNIST as downloaded: the four -idx?-ubyte.gz files (MNIST's names)", 2)
    idx_dir("idx/kmnist", *[rng.permutation(v) for v in a], mnist_names, False,
            "KMNIST, extracted: the four IDX files unzipped", 0)
    c = [rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 6, dtype=np.uint8),
         rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 3, dtype=np.uint8)]
    idx_dir("idx/hwc-32x32x3", *c, mnist_names, True,
            "IDX images of shape [n, 32, 32, 3] (kept: channels last), gzip'd", 1)
    h = "hostile/"
    bomb = npz_bytes(dict(npz_arrays(SEED + 3), x_train=np.zeros((2000, 28, 28), np.uint8)), True)
    out.reject(h + "bomb.npz.gz", gz(patch_central_size(bomb, "x_train.npy", 4096)),
               "a gzip'd npz whose x_train declares 4096 bytes and inflates to 1.5 MB",
               "inflates to more than the 4096 bytes")


def _zip(members: dict) -> bytes:
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return f.getvalue()


def _npy(a) -> bytes:
    f = io.BytesIO()
    np.save(f, a)
    return f.getvalue()


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    root = sys.argv[1]
    if os.path.isdir(root):
        for name in os.listdir(root):
            p = os.path.join(root, name)
            if name in ("manifest.json", "hostile", "npz", "npy-dir", "cifar", "idx") or name.endswith((".pkl", ".pkl.gz")):
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    os.makedirs(root, exist_ok=True)
    out = Out(root)
    accepted(out)
    hostile(out)
    npz(out)
    npz_gz_and_idx(out)
    cifar(out)
    manifest = {
        "generator": "scripts/make_fixtures.py",
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "files": out.files,
        "hostile": out.hostile,
        "npz": out.npz,
        "cifar": out.cifar,
    }
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(root, e["file"])) for e in out.files + out.hostile + out.npz + out.cifar
                if os.path.isfile(os.path.join(root, e["file"])))
    print(f"{root}: {len(out.files)} accepted, {len(out.npz)} npz/npy/idx, {len(out.cifar)} cifar, "
          f"{len(out.hostile)} hostile files, {total} bytes")


if __name__ == "__main__":
    main()
