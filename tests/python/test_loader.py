"""The loader against numpy's own unpickler, through `minibatchd inspect --json`.

scripts/make_fixtures.py writes every pickle variant the loader must accept
(Python 3 protocols 0-5 with numpy 2 and numpy 1.x module names, Python 2
protocols 0-2, every dtype, big-endian, Fortran order, the tutorial's list
form, ...) and hostile files it must reject, with a manifest of what numpy
itself reads from each. Here each accepted file must inspect to the same sets,
dtypes, shapes and sha256s, and each hostile one must fail with a message
that names the file and says what is wrong.

Environment:
    MINIBATCHD   the binary (default: target/debug/minibatchd under the repo root)

Run: python3 -m pytest tests/python  (after `cargo build`)
"""
from __future__ import annotations

import atexit
import functools
import gzip
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from paths import ROOT, SAMPLE, binary  # noqa: E402  (tests/python/paths.py)
SET_NAMES = ["train", "valid", "test"]
TIMEOUT_S = 120


def run_inspect(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # Only the error line on stderr, so the checks below see the message itself.
    env["MINIBATCHD_LOG"] = "error"
    env.pop("MINIBATCHD_DATA", None)
    return subprocess.run(
        [str(binary()), "inspect", "--json", *args],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=ROOT,
    )


@functools.lru_cache(maxsize=None)
def generated() -> tuple[Path, dict]:
    """Runs make_fixtures.py once per test session into a temporary folder
    (needed at collection time, to parametrize over the manifest)."""
    out = Path(tempfile.mkdtemp(prefix="minibatchd-fixtures-"))
    atexit.register(shutil.rmtree, out, True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_fixtures.py"), str(out)],
                   check=True, capture_output=True, timeout=TIMEOUT_S)
    return out, json.loads((out / "manifest.json").read_text())


def pytest_generate_tests(metafunc):
    if "accepted" in metafunc.fixturenames:
        files = generated()[1]["files"]
        metafunc.parametrize("accepted", files, ids=[f["file"] for f in files])
    if "hostile" in metafunc.fixturenames:
        files = generated()[1]["hostile"]
        metafunc.parametrize("hostile", files, ids=[f["file"].removeprefix("hostile/") for f in files])
    if "cifar_file" in metafunc.fixturenames:
        files = generated()[1]["cifar"]
        metafunc.parametrize("cifar_file", files, ids=[f["file"].removeprefix("cifar/") for f in files])
    if "npz_file" in metafunc.fixturenames:
        files = generated()[1]["npz"]
        metafunc.parametrize("npz_file", files, ids=[f["file"].removeprefix("npz/") for f in files])


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return generated()[0]


def sha256_le(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()).hexdigest()


def tensor_facts(t: dict) -> dict:
    return {"dtype": t["dtype"], "shape": list(t["shape"]), "sha256": t["sha256"]}


def assert_sets_match(got: dict, want_sets: list[dict], what: str) -> None:
    names = [s["name"] for s in got["sets"]]
    assert names == [s["name"] for s in want_sets], f"{what}: sets {names}"
    for g, w in zip(got["sets"], want_sets):
        assert g["examples"] == w["examples"], f"{what}: set {w['name']} examples"
        for k in ("x", "y"):
            assert tensor_facts(g[k]) == w[k], f"{what}: set {w['name']} tensor {k}"


# ---------------------------------------------------------------------------
# the fixture generator itself (no binary needed)
# ---------------------------------------------------------------------------

def test_manifest_is_complete(fixtures):
    m = generated()[1]
    assert len(m["files"]) >= 60 and len(m["hostile"]) >= 25
    total = 0
    for e in m["files"] + m["hostile"]:
        p = fixtures / e["file"]
        assert p.is_file(), e["file"]
        total += p.stat().st_size
    assert total < 5 * 2**20
    assert len(m["cifar"]) >= 10 and {e["format"] for e in m["cifar"]} == {"cifar-10", "cifar-100"}
    for e in m["cifar"]:
        assert (fixtures / e["file"]).exists(), e["file"]
    for e in m["files"]:
        assert [s["name"] for s in e["sets"]] == SET_NAMES
        for s in e["sets"]:
            assert s["x"]["shape"][0] == s["y"]["shape"][0] == s["examples"]
    for e in m["hostile"]:
        assert e["error_any"] and all(isinstance(s, str) and s for s in e["error_any"])


def test_cpu_bombs_are_tiny(fixtures):
    """The hostile files that once took minutes of CPU to reject are a few kB
    (test_rejects then checks each fails with its own error, within the
    inspect timeout)."""
    for name in ("build-state-bomb.pkl.gz", "shape-bomb.pkl.gz", "fortran-dims.pkl.gz", "set-copies.pkl.gz"):
        size = (fixtures / "hostile" / name).stat().st_size
        assert size < 4096, f"{name}: {size} bytes"
        assert len(gzip.decompress((fixtures / "hostile" / name).read_bytes())) > 10_000


def test_numpy_reads_py2_pickles_as_written(fixtures):
    """The hand-written Python 2 streams must mean what the manifest says to
    Python's own unpickler (make_fixtures derives the manifest that way; this
    re-checks one file independently, with the opcodes it must start with)."""
    raw = (fixtures / "py2-p2.pkl").read_bytes()
    assert raw.startswith(b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85U\x01b\x87Rq\x03(")
    assert raw.endswith(b"tb\x86q\x0e\x87q\x0f.")
    text = (fixtures / "py2-p0.pkl").read_bytes()
    assert text.startswith(b"((cnumpy.core.multiarray\n_reconstruct\np0\n(cnumpy\nndarray\np1\n(I0\ntp2\nS'b'\np3\ntp4\nRp5\n(I1\n(I7\nI784\ntp6\ncnumpy\ndtype\np7\n(S'f4'\np8\nI0\nI1\ntp9\nRp10\n(I3\nS'<'\np11\nNNNI-1\nI-1\nI0\ntp12\nbI00\nS'")


# ---------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------

def test_accepts(fixtures, accepted):
    path = fixtures / accepted["file"]
    r = run_inspect(str(path))
    assert r.returncode == 0, f"{accepted['file']} ({accepted['description']}) was rejected:\n{r.stderr}"
    got = json.loads(r.stdout)
    assert got["format"] == ("pickle+gzip" if accepted["file"].endswith(".gz") else "pickle")
    assert Path(got["source"]).name == path.name
    assert_sets_match(got, accepted["sets"], f"{accepted['file']} ({accepted['description']})")


def test_npz_accepts(fixtures, npz_file):
    """Keras-layout .npz archives (np.savez and np.savez_compressed) and a
    directory of the same arrays as .npy files: the
    same tensors as np.load reads, flattened and with widened labels, split
    by --valid-split."""
    path = fixtures / npz_file["file"]
    r = run_inspect("--valid-split", str(npz_file["valid_split"]), str(path))
    what = f"{npz_file['file']} ({npz_file['description']})"
    assert r.returncode == 0, f"{what} was rejected:\n{r.stderr}"
    got = json.loads(r.stdout)
    assert got["format"] == npz_file["format"]
    assert_sets_match(got, npz_file["sets"], what)


def test_npz_as_keras_writes_it(tmp_path):
    """An mnist.npz written here with np.savez_compressed, uint8 images and
    labels: the sha256s of what np.load reads back, x flattened to [n, 784]
    and y widened to int64."""
    rng = np.random.default_rng(7)
    a = {"x_train": rng.integers(0, 256, (9, 28, 28), dtype=np.uint8),
         "y_train": rng.integers(0, 10, 9, dtype=np.uint8),
         "x_test": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
         "y_test": rng.integers(0, 10, 3, dtype=np.uint8)}
    path = tmp_path / "mnist.npz"
    np.savez_compressed(path, **a)
    r = run_inspect("--valid-split", "4", str(path))
    assert r.returncode == 0, r.stderr
    got = {s["name"]: s for s in json.loads(r.stdout)["sets"]}
    want = {"train": (a["x_train"][:5], a["y_train"][:5]), "valid": (a["x_train"][5:], a["y_train"][5:]),
            "test": (a["x_test"], a["y_test"])}
    assert list(got) == list(want)
    for name, (x, y) in want.items():
        assert got[name]["x"]["dtype"] == "uint8" and got[name]["x"]["shape"] == [len(x), 784]
        assert got[name]["x"]["sha256"] == sha256_le(x.reshape(len(x), -1))
        assert got[name]["y"]["dtype"] == "int64" and got[name]["y"]["shape"] == [len(y)]
        assert got[name]["y"]["sha256"] == sha256_le(y.astype(np.int64))


def test_cifar_accepts(fixtures, cifar_file):
    """CIFAR-10 / CIFAR-100 python version: the tar.gz as downloaded (Python
    2 cPickle batches, GNU tar, the real member order), re-pickled by Python
    3 (protocols 2-5, str or bytes keys, numpy 1.x or 2.x names) in GNU,
    ustar and pax tars, a plain tar, and extracted folders (top or batches
    folder). Each must inspect to what pickle.load(f, encoding='latin1') +
    np.vstack + reshape(-1, 3, 32, 32) give, with int64 labels: no valid
    set by default, the last 3 training images and labels with
    --valid-split 3."""
    path = fixtures / cifar_file["file"]
    what = f"{cifar_file['file']} ({cifar_file['description']})"
    for extra, key in (([], "sets"), (["--valid-split", "3"], "sets_valid_3")):
        r = run_inspect(*extra, str(path))
        assert r.returncode == 0, f"{what} was rejected:\n{r.stderr}"
        got = json.loads(r.stdout)
        assert got["format"] == cifar_file["format"]
        assert Path(got["source"]).name == path.name
        assert_sets_match(got, cifar_file[key], what)
        for s in got["sets"]:
            assert s["x"]["uint8_divisor"] == 255, s["name"]


def test_cifar_py2_batches_are_cpickle_streams(fixtures):
    """The hand-written Python 2 batches: cPickle's opcodes (protocol 2, str
    keys as SHORT_BINSTRING, the array through numpy.core.multiarray
    _reconstruct with a BINSTRING payload) that Python 3 reads with
    encoding='latin1' (str keys) and encoding='bytes' (bytes keys) alike."""
    import pickletools
    import tarfile
    with tarfile.open(fixtures / "cifar" / "cifar-10-python.tar.gz") as t:
        names = t.getnames()
        raw = t.extractfile("cifar-10-batches-py/data_batch_1").read()
    assert names[1:] == [f"cifar-10-batches-py/{n}" for n in ("data_batch_4", "readme.html", "test_batch",
                                                              "data_batch_3", "batches.meta", "data_batch_2",
                                                              "data_batch_5", "data_batch_1")]
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
    assert ops[:4] == [("PROTO", 2), ("EMPTY_DICT", None), ("BINPUT", 1), ("MARK", None)]
    assert ("SHORT_BINSTRING", "data") in ops and ("SHORT_BINSTRING", "labels") in ops
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops
    assert any(name == "BINSTRING" and len(arg) == 100 * 3072 for name, arg in ops)
    assert not any(name in ("BINUNICODE", "BINBYTES", "SHORT_BINBYTES", "STACK_GLOBAL") for name, _ in ops)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = pickle.loads(raw, encoding="latin1")
        b = pickle.loads(raw, encoding="bytes")
    assert list(s) == ["batch_label", "labels", "data", "filenames"]
    assert list(b) == [b"batch_label", b"labels", b"data", b"filenames"]
    assert s["data"].dtype == np.uint8 and s["data"].shape == (100, 3072)
    assert np.array_equal(s["data"], b[b"data"]) and s["labels"] == b[b"labels"]


def test_rejects(fixtures, hostile):
    path = fixtures / hostile["file"]
    r = run_inspect(str(path))
    what = f"{hostile['file']} ({hostile['description']})"
    assert r.returncode != 0, f"{what} was accepted:\n{r.stdout[:2000]}"
    assert r.stdout.strip() == "", f"{what}: printed a result although it failed"
    lines = [line for line in r.stderr.splitlines() if any(e in line for e in hostile["error_any"])]
    assert lines, f"{what}: stderr has none of {hostile['error_any']}:\n{r.stderr}"
    assert any(path.name in line for line in lines), f"{what}: the error does not name the file:\n{r.stderr}"


# ---------------------------------------------------------------------------
# the bundled sample of real digits
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def sample_expected() -> list[dict]:
    with gzip.open(SAMPLE, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    sets = []
    for name, (x, y) in zip(SET_NAMES, data):
        sets.append({
            "name": name, "examples": len(y),
            "x": {"dtype": x.dtype.name, "shape": list(x.shape), "sha256": sha256_le(x)},
            "y": {"dtype": y.dtype.name, "shape": list(y.shape), "sha256": sha256_le(y)},
        })
    return sets


def test_sample_is_mnist_shaped():
    with gzip.open(SAMPLE, "rb") as f:
        raw = f.read()
    # Python 2 cPickle protocol 2, as deeplearning.net's mnist.pkl.gz
    assert raw.startswith(b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n")
    data = pickle.loads(raw, encoding="latin1")
    assert [len(y) for _, y in data] == [3000, 1000, 1000]
    for x, y in data:
        assert x.dtype == np.float32 and x.shape == (len(y), 784)
        assert y.dtype == np.int64 and y.min() >= 0 and y.max() <= 9
        assert np.array_equal(x * 256, np.round(x * 256)) and x.min() >= 0 and x.max() < 1
        assert set(np.unique(y).tolist()) == set(range(10))


def test_sample_matches_numpy():
    r = run_inspect(str(SAMPLE))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["format"] == "pickle+gzip"
    assert_sets_match(got, sample_expected(), str(SAMPLE))


def test_bundled_sample_is_the_data_file():
    r = run_inspect()
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert Path(got["source"]).name == SAMPLE.name
    assert_sets_match(got, sample_expected(), "bundled sample")
