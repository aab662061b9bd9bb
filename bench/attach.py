#!/usr/bin/env python3
"""The attach tier's benchmark (issue 12): same-host trainers that map the
daemon's memory, against the same trainers over loopback gRPC, in one run.

    python3 bench/attach.py [--file mnist.pkl.gz] [--rounds 5] [--seconds 2] [--quick] [--json out.json]

One daemon serves the file on TCP and on a Unix socket; each round runs every
test both ways, alternately, in this process with the Python client
(minibatch_client), so drift in the machine's speed hits both alike. Reports
medians over rounds with the spread (min..max):

  batch     minibatches/s of `batch("train", i, 500)` via attach (a zero-copy
            view; the test sums one byte per minibatch so a view is touched)
            against `get_batch("train", i, 500)` over loopback gRPC
            (goal: attach >= 20x)
  epoch     MB/s of x+y bytes of a shuffled epoch of size 500 via attach
            (rows gathered into fresh arrays) against the gRPC epoch stream
            (StreamBatches); and the single-core memcpy of the same run
            (numpy copyto of a train-x-sized array) (goals: >= 2x gRPC,
            >= 0.5x memcpy)
  memory    8 trainer processes each holding the whole train set (every page
            touched): attached, summing the PSS of the daemon and the 8; and
            8 processes each doing pickle.load(gzip.open(file)), what DDP
            ranks and DataLoader workers do today, summing their PSS (goal:
            attached <= 1.1 x dataset tensor bytes + 8 x 40 MiB)
  first     attach to first minibatch: Client(...).attach() then batch(),
            in a process that has imported the client (goal: <= 5 ms, p50)

Needs a built minibatchd ($MINIBATCHD, else target/release, else
target/debug) and the .venv scripts/test.sh makes. Without --file it uses
bench/out/mnist-full.pkl.gz (made by bench/load.py's make_full if missing);
--quick uses the bundled sample and short runs (CI: proves it runs, asserts
nothing about speed).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients" / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import minibatch_client as mc  # noqa: E402
from harness import find_binary, free_port, memcpy_limit  # noqa: E402  the serving benchmark's probes

TRAINERS = 8
SIZE = 500

# One trainer process of the memory test: holds the whole train set, touches
# every page, reports ready, and waits to be measured.
TRAINER = r"""
import sys, gzip, pickle
mode, target, examples = sys.argv[1], sys.argv[2], int(sys.argv[4])
if mode == "attach":
    sys.path.insert(0, sys.argv[3])
    import minibatch_client as mc
    a = mc.Client("unix://" + target).attach()
    x, y = a.batch("train", 0, examples)
else:
    sets = pickle.load(gzip.open(target), encoding="latin1")
    x, y = sets[0]
# Touch every page (as training reads every example).
s = float(x[:, ::256].sum()) + float(y.sum())
print("ready", flush=True)
sys.stdin.readline()
"""


def pss(pid: int) -> int:
    """Proportional set size of a process, bytes (/proc/PID/smaps_rollup)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def spread(v: list[float]) -> dict:
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}


def timed(seconds: float, step) -> tuple[int, float]:
    """Calls step(i) for about `seconds`; (calls, elapsed)."""
    t0 = time.perf_counter()
    i = 0
    while True:
        step(i)
        i += 1
        el = time.perf_counter() - t0
        if el >= seconds:
            return i, el


def memory_test(sock: Path, daemon_pid: int, data: Path, examples: int) -> dict:
    """Sum of PSS: daemon + 8 attached trainers, and 8 pickle.load trainers."""
    out = {}
    for mode, target in (("attach", str(sock)), ("pickle", str(data))):
        procs = []
        try:
            for _ in range(TRAINERS):
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", TRAINER, mode, target, str(ROOT / "clients" / "python"), str(examples)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            for p in procs:
                line = p.stdout.readline()
                if line.strip() != "ready":
                    raise RuntimeError(f"{mode} trainer failed (exit {p.wait()})")
            trainers = [pss(p.pid) for p in procs]
            daemon = pss(daemon_pid) if mode == "attach" else 0
            out[mode] = {"trainers_pss": trainers, "daemon_pss": daemon, "sum": sum(trainers) + daemon}
        finally:
            for p in procs:
                if p.poll() is None:
                    try:
                        p.stdin.write("\n")
                        p.stdin.flush()
                    except OSError:
                        pass
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.seconds = 2, 0.3
        data = a.file or ROOT / "data" / "mnist-sample.pkl.gz"
    else:
        data = a.file or ROOT / "bench" / "out" / "mnist-full.pkl.gz"
        if not data.exists():
            from load import make_full
            print(f"writing {data} ...", file=sys.stderr)
            make_full(data)
    bin_ = find_binary()
    tmp = Path(tempfile.mkdtemp(prefix="mb-attach-bench-"))
    sock = tmp / "minibatchd.sock"
    port = free_port()
    log = open(tmp / "daemon.log", "wb")
    daemon = subprocess.Popen([bin_, "serve", "--data", str(data), "--addr", f"127.0.0.1:{port}",
                               "--metrics-addr", "off", "--uds", str(sock)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if daemon.poll() is not None:
                sys.exit(f"daemon exited: {(tmp / 'daemon.log').read_text()[-2000:]}")
            try:
                with mc.Client(f"127.0.0.1:{port}", timeout=5) as c:
                    if c.health() and sock.exists():
                        info = c.info()
                        break
            except mc.MinibatchError:
                pass
            if time.monotonic() > deadline:
                sys.exit("daemon never became healthy")
            time.sleep(0.1)
        train = info.sets["train"]
        row = int(np.prod(train.x.shape)) * 4 + 8
        tensor_bytes = sum(s.examples * (int(np.prod(s.x.shape)) * np.dtype(s.x.dtype).itemsize
                                         + int(np.prod(s.y.shape or (1,))) * np.dtype(s.y.dtype).itemsize)
                           for s in info.sets.values())
        n_batches = train.examples // SIZE
        res: dict = {"file": str(data), "binary": bin_, "rounds": a.rounds, "seconds": a.seconds,
                     "tensor_bytes": tensor_bytes}
        grpc = mc.Client(f"127.0.0.1:{port}", timeout=60)
        att = mc.Client("unix://" + str(sock)).attach()
        # Same bytes both ways before measuring anything.
        for i in (0, n_batches - 1):
            gx, gy = grpc.get_batch("train", i, SIZE)
            ax, ay = att.batch("train", i, SIZE)
            assert np.array_equal(gx, ax) and np.array_equal(gy, ay), f"minibatch {i} differs"
        rates = {"attach": [], "grpc": []}
        epoch = {"attach": [], "grpc": []}
        memcpy = []
        sink = [0]
        for r in range(a.rounds):
            order = ["attach", "grpc"] if r % 2 == 0 else ["grpc", "attach"]
            for who in order:
                if who == "attach":
                    def step(i):
                        x, y = att.batch("train", i % n_batches, SIZE)
                        sink[0] += int(x[-1, -1] > 0)  # touch the view
                else:
                    def step(i):
                        x, y = grpc.get_batch("train", i % n_batches, SIZE)
                        sink[0] += int(x[-1, -1] > 0)
                n, el = timed(a.seconds, step)
                rates[who].append(n / el)
            for who in order:
                t0 = time.perf_counter()
                nbytes = 0
                it = att.epoch("train", SIZE, shuffle=True, seed=r, epoch=r) if who == "attach" else \
                    grpc.epoch("train", SIZE, shuffle=True, seed=r, epoch=r)
                for x, y in it:
                    nbytes += x.nbytes + y.nbytes
                epoch[who].append(nbytes / (time.perf_counter() - t0) / 1e6)
            memcpy.append(memcpy_limit(train.examples * (row - 8))["bytes_per_s"] / 1e6)
        # Attach to first minibatch.
        firsts = []
        for _ in range(20 if a.quick else 100):
            t0 = time.perf_counter()
            with mc.Client("unix://" + str(sock)).attach() as f:
                x, y = f.batch("train", 0, SIZE)
                sink[0] += int(x[0, 0] > 0)
                firsts.append(time.perf_counter() - t0)
        att.close()
        grpc.close()
        mem = memory_test(sock, daemon.pid, data, train.examples)
        res["batch_per_s"] = {k: spread(v) for k, v in rates.items()}
        res["epoch_mb_per_s"] = {k: spread(v) for k, v in epoch.items()}
        res["memcpy_mb_per_s"] = spread(memcpy)
        firsts.sort()
        res["attach_to_first_ms"] = {"p50": statistics.median(firsts) * 1e3,
                                     "p99": firsts[int(len(firsts) * 0.99) - 1] * 1e3,
                                     "min": firsts[0] * 1e3, "max": firsts[-1] * 1e3}
        res["memory"] = mem
    finally:
        daemon.terminate()
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)

    b, e, m = res["batch_per_s"], res["epoch_mb_per_s"], res["memcpy_mb_per_s"]
    mib = 2 ** 20
    goal_mem = 1.1 * tensor_bytes + TRAINERS * 40 * mib
    ratios = {
        "batch(500): attach / GetBatch (goal >= 20)": b["attach"]["median"] / b["grpc"]["median"],
        "shuffled epoch: attach / gRPC stream (goal >= 2)": e["attach"]["median"] / e["grpc"]["median"],
        "shuffled epoch: attach / memcpy (goal >= 0.5)": e["attach"]["median"] / m["median"],
        "memory: attached sum PSS / goal (goal <= 1)": mem["attach"]["sum"] / goal_mem,
        "memory: pickle.load sum PSS / attached": mem["pickle"]["sum"] / mem["attach"]["sum"],
        "attach to first minibatch, p50 ms (goal <= 5)": res["attach_to_first_ms"]["p50"],
    }
    res["ratios"] = ratios

    def sp(d, nd=0):
        return f"{d['median']:,.{nd}f} ({d['min']:,.{nd}f}..{d['max']:,.{nd}f})"

    lines = [
        f"attach benchmark: {Path(data).name}, tensors {tensor_bytes / 1e6:,.0f} MB; {a.rounds} rounds of {a.seconds} s, "
        f"alternated; median (min..max)",
        f"{'test':<44}{'attach':>26}{'gRPC (loopback)':>26}",
        f"{'batch(train, i, 500) per s':<44}{sp(b['attach']):>26}{sp(b['grpc']):>26}",
        f"{'shuffled epoch, size 500, MB/s':<44}{sp(e['attach']):>26}{sp(e['grpc']):>26}",
        f"{'single-core memcpy, MB/s':<44}{sp(m):>26}",
        f"{'memory, 8 trainers holding train: sum PSS MiB':<44}"
        f"{mem['attach']['sum'] / mib:>26,.0f}{'':>26}",
        f"{'  (daemon ' + format(mem['attach']['daemon_pss'] / mib, ',.0f') + ' MiB + trainers)':<44}",
        f"{'memory, 8 x pickle.load: sum PSS MiB':<44}{'':>26}{mem['pickle']['sum'] / mib:>26,.0f}",
        f"{'attach to first minibatch ms, p50 / p99':<44}"
        f"{res['attach_to_first_ms']['p50']:>18.2f} / {res['attach_to_first_ms']['p99']:.2f}",
        "",
    ]
    lines += [f"{k:<58}{v:>9.2f}" for k, v in ratios.items()]
    lines.append(f"memory goal: 1.1 x {tensor_bytes / mib:,.0f} MiB + {TRAINERS} x 40 MiB = {goal_mem / mib:,.0f} MiB")
    lines.append(f"\ncommand: python3 bench/attach.py" + (" --quick" if a.quick else f" --rounds {a.rounds} --seconds {a.seconds}")
                 + (f" --file {a.file}" if a.file else ""))
    print("\n".join(lines))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
