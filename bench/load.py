#!/usr/bin/env python3
"""Load-time benchmark (issue 2): whole processes, side by side, one run.

Compares, on the same full-size file, alternating the commands run by run:
  inspect   `minibatchd inspect --json FILE` (load + sha256/range/histogram of every tensor)
  ready     `minibatchd serve --data FILE` until it logs "serving gRPC" (load, pin,
            listen: health answers from then; hashing runs later in the background)
  ready-uds the same with `--uds`: the dataset in shared memory that same-host
            trainers can attach to (memfds), its tensors aligned
  ready-two the file twice as two datasets (--data a=FILE --data b=FILE),
            loaded side by side: ready-two / ready is 1 when they overlap fully,
            2 when one waits for the other
  inflate   `minibatchd inflate FILE` (only the loader's decompressor: the floor)
  python    `pickle.load(gzip.open(FILE), encoding='latin1')` in a fresh Python
  gunzip    `gzip -dc FILE > /dev/null` (zlib, for reference)
Reports median wall time and peak RSS (ru_maxrss of the process) and the ratios.

Without --file it writes bench/out/mnist-full.pkl.gz: the bundled real digits
repeated to 50,000 / 10,000 / 10,000 x 784 float32 in the original file's
pickle form (Python 2 protocol 2, gzip level 9 as Python's gzip module writes).

    python3 bench/load.py [--file mnist.pkl.gz] [--runs 7] [--json out.json]

With --cifar, CIFAR-10's start-up instead (issue 15), on a full-size
cifar-10-python.tar.gz (50,000 + 10,000 images of 3,072 bytes, Python 2
cPickle batches in the real archive's member order, made once with numpy and
cached under target/bench/) and its extracted folder, alternated run by run:
  ready-tar   `minibatchd serve --data cifar-10-python.tar.gz` until "serving gRPC"
  ready-dir   the same from the extracted folder (cifar-10-batches-py/)
  python-tar  torchvision's CIFAR10 logic on the archive: tarfile read in member
              order, pickle.load(f, encoding='latin1') per batch, np.vstack,
              reshape(-1, 3, 32, 32) (and the same for test_batch)
  python-dir  the same from the extracted folder (what torchvision does after
              its one-time extraction)
and reports medians, the spread over runs, and per-run ratios.

    python3 bench/load.py --cifar [--runs 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def make_full(path: Path, counts: tuple[int, int, int] = (50_000, 10_000, 10_000), compresslevel: int = 9) -> None:
    """The bundled real digits repeated to `counts` (train, valid, test)
    examples, in mnist.pkl.gz's pickle form (Python 2 protocol 2)."""
    import numpy as np
    import py2pickle

    with gzip.open(ROOT / "data" / "mnist-sample.pkl.gz", "rb") as f:
        sets = pickle.load(f, encoding="latin1")
    x = np.concatenate([s[0] for s in sets])
    y = np.concatenate([s[1] for s in sets])

    def rep(n, off):
        idx = (np.arange(n) + off) % len(x)
        return np.ascontiguousarray(x[idx]), np.ascontiguousarray(y[idx])

    data = py2pickle.dumps((rep(counts[0], 0), rep(counts[1], 1234), rep(counts[2], 2345)), protocol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=compresslevel, mtime=0) as g:
        g.write(data)


def run(cmd: list[str], until: bytes | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one process.

    Peak RSS comes from /usr/bin/time (%M), never from this process's
    rusage: Linux carries a parent's high-water mark into its children, and
    this script holds the dataset itself while it makes the file. With
    `until`, the time is taken when that text appears on stderr, the peak RSS
    read from /proc/PID/status (VmHWM) at that moment, then the process is
    stopped (SIGTERM)."""
    t0 = time.perf_counter()
    if until:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        buf = b""
        while until not in buf:
            line = p.stderr.readline()
            if not line:
                raise RuntimeError(f"{cmd} exited before printing {until!r}: {buf[-2000:]!r}")
            buf += line
        wall = time.perf_counter() - t0
        status = Path(f"/proc/{p.pid}/status").read_text()
        hwm = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:"))
        p.terminate()
        p.wait()
        return wall, hwm * 1024
    with tempfile.NamedTemporaryFile("r") as t:
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", t.name, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{cmd} failed with status {p.returncode}")
        return wall, int(t.read().split()[-1]) * 1024


CIFAR10_ORDER = ("data_batch_4", "readme.html", "test_batch", "data_batch_3",
                 "batches.meta", "data_batch_2", "data_batch_5", "data_batch_1")


def measure(cmds: dict, runs: int, py: str) -> dict[str, list[tuple[float, int]]]:
    """(seconds, peak RSS) of each command, `runs` times, side by side.

    This VM hands freed memory back to its host after a moment, and the
    next process to touch that much memory pays for it again (seen here:
    the same load took 140 ms right after another big process and 560 ms
    after a pause). So every measured process starts right after a warmer
    that touches and frees 512 MiB, and the order rotates each run."""
    res: dict[str, list[tuple[float, int]]] = {k: [] for k in cmds}
    warm = [py, "-c", "b = b'\\x01' * (512 << 20)"]
    names = list(cmds)
    for r in range(runs):
        for k in names[r % len(names):] + names[: r % len(names)]:
            cmd, until = cmds[k]
            subprocess.run(warm, check=True)
            res[k].append(run(cmd, until))
        print(f"run {r + 1}/{runs} done", file=sys.stderr)
    return res


def make_cifar(tar_gz: Path, folder: Path) -> None:
    """A full-size cifar-10-python.tar.gz and its extracted folder: 5 + 1
    batches of 10,000 images, each a Python 2 cPickle dict (batch_label,
    labels, data, filenames) as the originals, written by the fixtures'
    hand-written cPickle writer. The images are smooth 8 x 8 noise blown up
    4x plus 3 bits of fine noise, so gzip finds about as little to squeeze
    as in the real photos (163 MB for 184 MB of pixels)."""
    import io
    import tarfile
    import numpy as np
    import make_fixtures

    rng = np.random.default_rng(2009)
    members = {}
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        small = rng.integers(0, 224, (10_000, 3, 8, 8), dtype=np.uint8)
        data = small.repeat(4, axis=2).repeat(4, axis=3) + rng.integers(0, 8, (10_000, 3, 32, 32), dtype=np.uint8)
        members[name] = make_fixtures.py2_dict({
            b"batch_label": f"{name} of 5".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, 10_000)],
            b"data": np.ascontiguousarray(data.reshape(10_000, 3072)),
            b"filenames": [b"image_%05d.png" % i for i in range(10_000)],
        })
    members["readme.html"] = b"<html>synthetic CIFAR-10 for bench/load.py</html>\n"
    members["batches.meta"] = make_fixtures.py2_dict({b"label_names": [b"airplane"], b"num_cases_per_batch": 10_000,
                                                       b"num_vis": 3072})
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in members.items():
        (folder / name).write_bytes(data)
    raw = make_fixtures.tar_bytes("cifar-10-batches-py", members, order=CIFAR10_ORDER, compress=False)
    tmp = tar_gz.with_suffix(".tmp")
    with open(tmp, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as g:
        g.write(raw)
    tmp.rename(tar_gz)


PY_CIFAR_TAR = """
import pickle, tarfile, numpy as np
want = ['data_batch_%d' % i for i in range(1, 6)] + ['test_batch']
got = {{}}
with tarfile.open({f!r}, 'r:gz') as t:
    for m in t:
        base = m.name.rsplit('/', 1)[-1]
        if base in want:
            got[base] = pickle.load(t.extractfile(m), encoding='latin1')
x = np.vstack([got[n]['data'] for n in want[:5]]).reshape(-1, 3, 32, 32)
y = [l for n in want[:5] for l in got[n]['labels']]
xt = got['test_batch']['data'].reshape(-1, 3, 32, 32)
"""

PY_CIFAR_DIR = """
import pickle, numpy as np
data, targets = [], []
for n in ['data_batch_%d' % i for i in range(1, 6)]:
    with open({f!r} + '/' + n, 'rb') as f:
        entry = pickle.load(f, encoding='latin1')
    data.append(entry['data'])
    targets.extend(entry['labels'])
x = np.vstack(data).reshape(-1, 3, 32, 32)
with open({f!r} + '/test_batch', 'rb') as f:
    xt = pickle.load(f, encoding='latin1')['data'].reshape(-1, 3, 32, 32)
"""


def cifar_main(a) -> None:
    out = ROOT / "target" / "bench"
    tar_gz, folder = out / "cifar-10-python.tar.gz", out / "cifar-10-batches-py"
    if not tar_gz.exists() or not (folder / "test_batch").exists():
        print(f"writing {tar_gz} and {folder} ...", file=sys.stderr)
        make_cifar(tar_gz, folder)
    py = sys.executable
    serve = [a.bin, "--log", "info", "serve", "--addr", "127.0.0.1:0", "--metrics-addr", "off", "--data"]
    cmds = {
        "ready-tar": (serve + [str(tar_gz)], b"serving gRPC"),
        "ready-dir": (serve + [str(folder)], b"serving gRPC"),
        "python-tar": ([py, "-c", PY_CIFAR_TAR.format(f=str(tar_gz))], None),
        "python-dir": ([py, "-c", PY_CIFAR_DIR.format(f=str(folder))], None),
    }
    res = measure(cmds, a.runs, py)
    tensor_bytes = 60_000 * (3072 + 8)
    lines = [
        f"file {tar_gz.name}: {tar_gz.stat().st_size:,} bytes, tensors {tensor_bytes:,} bytes; "
        f"median of {a.runs} runs, alternated",
        f"{'process':<12}{'wall ms':>10}{'peak RSS MiB':>14}",
    ]
    med = {k: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for k, v in res.items()}
    for k, (w, m) in med.items():
        walls = [w for w, _ in res[k]]
        rss = [m for _, m in res[k]]
        lines.append(f"{k:<12}{w * 1e3:>10.0f}{m / 2**20:>14.0f}   wall {min(walls) * 1e3:.0f}..{max(walls) * 1e3:.0f} ms,"
                     f" RSS {min(rss) / 2**20:.0f}..{max(rss) / 2**20:.0f} MiB")
    lines.append("")
    lines.append(f"{'ratio (per run: same run index)':<44}{'median':>8}{'min':>8}{'max':>8}")
    ratios = {}
    for py_k, mb_k in (("python-tar", "ready-tar"), ("python-dir", "ready-dir")):
        for what, i in (("wall", 0), ("peak RSS", 1)):
            rs = [p[i] / m[i] for p, m in zip(res[py_k], res[mb_k])]
            key = f"{py_k} / {mb_k}, {what}"
            ratios[key] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
            lines.append(f"{key:<44}{statistics.median(rs):>8.2f}{min(rs):>8.2f}{max(rs):>8.2f}")
    lines.append(f"ready-tar peak RSS / tensors: {med['ready-tar'][1] / tensor_bytes:.2f}")
    lines.append(f"\ncommand: python3 bench/load.py --cifar --runs {a.runs}")
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps({"median": {k: {"wall_s": w, "peak_rss_bytes": m} for k, (w, m) in med.items()},
                                      "ratios": ratios, "runs": res}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", type=Path)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "minibatchd"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--compare", metavar="OLD_BIN",
                    help="also run `serve` of this other binary (row ready-old), alternated with the rest: "
                         "a server change's start-up and peak RSS side by side")
    ap.add_argument("--cifar", action="store_true", help="CIFAR-10's start-up rows instead (see the module doc)")
    a = ap.parse_args()
    if a.cifar:
        return cifar_main(a)
    f = a.file or ROOT / "bench" / "out" / "mnist-full.pkl.gz"
    if not f.exists():
        print(f"writing {f} ...", file=sys.stderr)
        make_full(f)
    py = sys.executable
    cmds = {
        "inspect": ([a.bin, "--log", "warn", "inspect", "--json", str(f)], None),
        "ready": ([a.bin, "--log", "info", "serve", "--data", str(f), "--addr", "127.0.0.1:0", "--metrics-addr", "off"], b"serving gRPC"),
        "inflate": ([a.bin, "inflate", str(f)], None),
        "python": ([py, "-c", f"import pickle,gzip; pickle.load(gzip.open({str(f)!r}), encoding='latin1')"], None),
    }
    # The same with a Unix socket: the dataset then goes into shared memory
    # (memfds) that trainers can attach to, and its tensors are aligned.
    uds_dir = tempfile.mkdtemp(prefix="mb-load-")
    cmds["ready-uds"] = ([a.bin, "--log", "info", "serve", "--data", str(f), "--addr", "127.0.0.1:0",
                          "--metrics-addr", "off", "--uds", os.path.join(uds_dir, "s.sock")], b"serving gRPC")
    # Two datasets (the same file twice, under two names): loaded side by
    # side, so ideally in the time of one (catalog::load).
    cmds["ready-two"] = ([a.bin, "--log", "info", "serve", "--data", f"a={f}", "--data", f"b={f}",
                          "--addr", "127.0.0.1:0", "--metrics-addr", "off"], b"serving gRPC")
    if a.compare:
        cmds["ready-old"] = ([a.compare, "--log", "info", "serve", "--data", str(f), "--addr", "127.0.0.1:0",
                              "--metrics-addr", "off"], b"serving gRPC")
    if shutil.which("gzip"):
        cmds["gunzip"] = (["sh", "-c", f"gzip -dc '{f}' > /dev/null"], None)
    res = measure(cmds, a.runs, py)
    tensor_bytes = 70_000 * (784 * 4 + 8)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for k, v in res.items()}
    rss_goal = 1.15 * tensor_bytes + 32 * 2**20
    lines = [
        f"file {f.name}: {f.stat().st_size:,} bytes, tensors {tensor_bytes:,} bytes; median of {a.runs} runs, alternated",
        f"{'process':<10}{'wall ms':>10}{'peak RSS MiB':>14}",
    ]
    for k, (w, m) in med.items():
        walls = [w for w, _ in res[k]]
        lines.append(f"{k:<10}{w * 1e3:>10.0f}{m / 2**20:>14.0f}   wall {min(walls) * 1e3:.0f}..{max(walls) * 1e3:.0f} ms")
    ratios = {
        "python / inspect (goal >= 5)": med["python"][0] / med["inspect"][0],
        "python / ready (goal >= 5)": med["python"][0] / med["ready"][0],
        "inspect / inflate (goal <= 1.25)": med["inspect"][0] / med["inflate"][0],
        "ready / inflate (goal <= 1.25)": med["ready"][0] / med["inflate"][0],
        "ready peak RSS / (1.15 x tensors + 32 MiB) (goal <= 1)": med["ready"][1] / rss_goal,
        "python peak RSS / tensors": med["python"][1] / tensor_bytes,
    }
    ratios["ready-uds / ready, wall (the cost of attachable memory)"] = med["ready-uds"][0] / med["ready"][0]
    ratios["ready-two / ready, wall (2 = one after the other)"] = med["ready-two"][0] / med["ready"][0]
    if a.compare:
        ratios["ready / ready-old, wall"] = med["ready"][0] / med["ready-old"][0]
        ratios["ready / ready-old, peak RSS"] = med["ready"][1] / med["ready-old"][1]
    lines.append("")
    lines += [f"{k:<58}{v:>7.2f}" for k, v in ratios.items()]
    shutil.rmtree(uds_dir, ignore_errors=True)
    lines.append(f"\ncommand: python3 bench/load.py --runs {a.runs}" + (f" --file {a.file}" if a.file else "")
                 + (f" --compare {a.compare}" if a.compare else ""))
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps({"median": {k: {"wall_s": w, "peak_rss_bytes": m} for k, (w, m) in med.items()}, "ratios": ratios, "runs": {k: v for k, v in res.items()}}, indent=1))


if __name__ == "__main__":
    main()
