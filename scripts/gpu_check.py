#!/usr/bin/env python3
"""The device tier on a real GPU (issue 13): run by scripts/gpu-check.sh on a
host with an NVIDIA driver, torch and (optionally) CuPy, with a release
binary built elsewhere. Writes one JSON of results and exits non-zero when
a check fails. Every check is independent: a failure is recorded and the
rest still run.

Checks:
  placed        the daemon copies the dataset to the device (GetInfo devices)
  bytes         every region of the device copy has the daemon's sha256 (verify)
  batch, epoch  device batch slices and shuffled epoch gathers equal the host
                attachment's bytes, bit for bit
  shared_once   3 trainer processes attached: free device memory drops by
                their CUDA contexts, not by 3 copies of the dataset
  timing        minibatch of 500 ready on the device: slice and shuffled gather
                (CUDA events, median of many) against GetBatch over gRPC plus
                the host-to-device copy
  sigterm       the daemon waits on SIGTERM while trainers hold device memory,
                exits 0 once they are gone
  no_device     --device cuda:0 with no visible device fails at start-up

    python3 scripts/gpu_check.py --binary target/release/minibatchd --out gpu-check.json

`--emulated` runs the checks that need no CUDA (placed, bytes,
batch_and_epoch, sigterm) against the daemon's emulated backend: a dry run
of this script on a machine without a GPU (tests/python/test_device.py
runs it), so that a GPU host's few minutes are not spent on its bugs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients" / "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import minibatch_client as mc  # noqa: E402
from minibatch_client import attach as mca  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EMULATED_GPU0 = "GPU-656d756c-6174-6564-0000-000000000000"


class Daemon:
    def __init__(self, binary: str, tmp: Path, *args: str, grace: int = 30, env_extra: dict | None = None):
        self.sock = tmp / f"m{free_port()}.sock"
        self.address = f"127.0.0.1:{free_port()}"
        self.target = f"unix://{self.sock}"
        self.log = tmp / f"daemon-{self.address.replace(':', '-')}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINIBATCHD_")}
        env.update(env_extra or {})
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([binary, "serve", "--addr", self.address, "--metrics-addr", "off",
                                          "--uds", str(self.sock), "--shutdown-grace-secs", str(grace), *args],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        t0 = time.monotonic()
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError(f"daemon did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def cuda_events_us(fn, reps: int = 200) -> dict:
    """Median and p90 of fn() in microseconds, timed with CUDA events."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1000.0)
    out.sort()
    return {"median_us": statistics.median(out), "p90_us": out[int(len(out) * 0.9)], "reps": reps}


def wall_us(fn, reps: int = 100, sync: bool = True) -> dict:
    """Median and p90 of fn() in microseconds of wall time; with `sync`,
    until the device has finished what fn() queued."""
    for _ in range(5):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e6)
    out.sort()
    return {"median_us": statistics.median(out), "p90_us": out[int(len(out) * 0.9)], "reps": reps}


TRAINER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import torch
    from minibatch_client import attach
    a = attach.connect({target!r}, device={device!r})
    x, y = a.batch("train", 0, 500)
    if x.is_cuda:
        torch.cuda.synchronize()
    print("attached", flush=True)
    sys.stdin.readline()
""")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--out", default="gpu-check.json")
    # Bigger than a CUDA context (~0.5 GB per process with torch), so that
    # shared_once tells one copy for all trainers from one copy each.
    ap.add_argument("--examples", type=int, default=2_000_000,
                    help="rows of the synthetic uint8 [n, 784] dataset (2,000,000 = 1.57 GB)")
    ap.add_argument("--emulated", action="store_true", help="dry run without CUDA (see the module docs)")
    a = ap.parse_args()
    emulated = a.emulated
    dev_name = EMULATED_GPU0 if emulated else "cuda:0"
    results: dict = {"host": socket.gethostname(), "torch": torch.__version__, "emulated": emulated,
                     "device": "emulated" if emulated else torch.cuda.get_device_name(0), "checks": {}}
    try:
        import cupy

        results["cupy"] = cupy.__version__
    except ImportError:
        results["cupy"] = None
    checks = results["checks"]
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    def check(name):
        def wrap(fn):
            t0 = time.monotonic()
            try:
                r = fn()
                checks[name] = {"ok": True, **(r or {})}
            except Exception as e:  # recorded, and the other checks still run
                checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()[-2000:]}
            checks[name]["seconds"] = round(time.monotonic() - t0, 2)
            print(f"{name}: {'ok' if checks[name]['ok'] else 'FAIL'} {checks[name]}"[:400], flush=True)
        return wrap

    # A big dataset, so that one copy per trainer would show.
    rng = np.random.default_rng(0)
    n = a.examples
    data = tmp / "big.npz"
    np.savez(data, x_train=rng.integers(0, 256, (n, 784), dtype=np.uint8),
             y_train=rng.integers(0, 10, n).astype(np.uint8),
             x_test=rng.integers(0, 256, (10_000, 784), dtype=np.uint8),
             y_test=rng.integers(0, 10, 10_000).astype(np.uint8))
    if not emulated:
        free0, total = torch.cuda.mem_get_info(0)
        results["device_total_bytes"] = total
    d = Daemon(a.binary, tmp, "--data", str(data), "--device", "cuda:0",
               env_extra={"MINIBATCHD_DEVICE_BACKEND": "emulated"} if emulated else None)
    try:
        @check("placed")
        def _():
            with mc.Client(d.address) as c:
                info = c.info()
            devs = [dict(uuid=x.uuid, name=x.name, bytes=x.bytes, backend=x.backend) for x in info.devices]
            assert devs and devs[0]["backend"] == ("emulated" if emulated else "cuda"), devs
            return {"devices": devs, "dataset_bytes": info.memory_bytes}

        @check("bytes")
        def _():
            with mca.connect(d.target, device=dev_name) as dev:
                dev.verify()
                return {"regions": len(dev.regions), "opener": "cupy" if results["cupy"] else "ctypes"}

        @check("batch_and_epoch")
        def _():
            with mca.connect(d.target) as host, mca.connect(d.target, device=dev_name) as dev:
                last = host.num_batches("train", 500) - 1
                for set_, i, s in [("train", 0, 500), ("train", last // 2, 500), ("train", last, 500),
                                   ("valid", 3, 1000), ("test", 19, 500)]:
                    hx, hy = host.batch(set_, i, s)
                    dx, dy = dev.batch(set_, i, s)
                    assert dx.is_cuda != emulated and np.array_equal(dx.cpu().numpy(), hx) and np.array_equal(dy.cpu().numpy(), hy)
                order = dict(shuffle=True, seed=5, epoch=2, rank=1, world_size=2)
                k = 0
                for (hx, hy), (dx, dy) in zip(host.epoch("train", 500, **order, count=50),
                                              dev.epoch("train", 500, **order, count=50)):
                    assert np.array_equal(dx.cpu().numpy(), hx) and np.array_equal(dy.cpu().numpy(), hy)
                    k += 1
                assert k == min(50, host.num_batches("train", 500, world_size=2)), k
                return {"epoch_minibatches_compared": k}

        @check("torch_dataset")
        def _():
            from minibatch_client.torch import MinibatchDataset

            kw = dict(shuffle=True, seed=1, rank=0, world_size=2)
            host = MinibatchDataset(d.target, "train", 500, decode=False, **kw)
            dev = MinibatchDataset(d.target, "train", 500, decode=False, device_attach=dev_name, **kw)
            n = 0
            for (hx, hy), (dx, dy) in zip(host, dev):
                assert dx.is_cuda != emulated
                assert torch.equal(dx.cpu(), hx) and torch.equal(dy.cpu(), hy)
                n += 1
                if n == 20:
                    break
            return {"minibatches_compared": n}

        @check("timing")
        def _():
            if emulated:
                return {"skipped": "needs CUDA"}
            with mca.connect(d.target, device=dev_name) as dev, mc.Client(d.address) as c:
                x, y = dev.tensors("train")
                perm = torch.randperm(x.shape[0], device=x.device)
                state = {"i": 0}
                assert x.shape[0] >= 100 * 500, "timing takes 100 different minibatches of 500"

                def sl():
                    i = state["i"] = (state["i"] + 1) % 100
                    return dev.batch("train", i, 500)

                def ga():
                    i = state["i"] = (state["i"] + 1) % 100
                    sel = perm[i * 500:(i + 1) * 500]
                    return x.index_select(0, sel), y.index_select(0, sel)

                def grpc():
                    i = state["i"] = (state["i"] + 1) % 100
                    bx, by = c.get_batch("train", i, 500)
                    return torch.from_numpy(bx).cuda(non_blocking=False), torch.from_numpy(by).cuda()

                # A slice queues no device work: its cost is the host's, in
                # wall time. A gather is device work: CUDA events, and the
                # wall time until it is done as a trainer would wait for it.
                r = {"slice": wall_us(sl, 1000, sync=False), "gather": cuda_events_us(ga),
                     "gather_wall_synced": wall_us(ga, 200), "grpc_plus_h2d": wall_us(grpc)}
                r["grpc_over_slice"] = r["grpc_plus_h2d"]["median_us"] / max(r["slice"]["median_us"], 1e-3)
                r["grpc_over_gather"] = r["grpc_plus_h2d"]["median_us"] / max(r["gather"]["median_us"], 1e-3)
                r["goals"] = {"slice_le_20us": r["slice"]["median_us"] <= 20,
                              "gather_le_100us": r["gather"]["median_us"] <= 100,
                              "ge_10x_grpc": r["grpc_over_gather"] >= 10}
                return r

        @check("shared_once")
        def _():
            if emulated:
                return {"skipped": "needs CUDA"}
            torch.cuda.synchronize()
            free1, _ = torch.cuda.mem_get_info(0)
            procs = [subprocess.Popen([sys.executable, "-c", TRAINER.format(root=str(ROOT / "clients" / "python"),
                                                                             target=d.target, device=dev_name)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(3)]
            try:
                for p in procs:
                    line = p.stdout.readline().strip()
                    assert line == "attached", line
                free2, _ = torch.cuda.mem_get_info(0)
            finally:
                for p in procs:
                    p.stdin.write("\n")
                    p.stdin.flush()
                    p.wait(60)
            with mc.Client(d.address) as c:
                copy = c.info().devices[0].bytes
            per_trainer = (free1 - free2) / 3
            r = {"dataset_on_device_bytes": copy, "free_drop_daemon_bytes": free0 - free1,
                 "free_drop_per_trainer_bytes": per_trainer}
            assert per_trainer < copy, r
            return r

        @check("sigterm")
        def _():
            p = subprocess.Popen([sys.executable, "-c", TRAINER.format(root=str(ROOT / "clients" / "python"),
                                                                        target=d.target, device=dev_name)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "attached"
            d.proc.send_signal(signal.SIGTERM)
            time.sleep(2)
            waited = d.proc.poll() is None
            p.stdin.write("\n")
            p.stdin.flush()
            p.wait(60)
            d.proc.wait(60)
            assert waited and d.proc.returncode == 0, (waited, d.proc.returncode)
            return {"waited_for_holder": waited, "exit": d.proc.returncode}
    finally:
        d.stop()

    @check("no_device")
    def _():
        if emulated:
            return {"skipped": "needs CUDA"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINIBATCHD_")}
        env["CUDA_VISIBLE_DEVICES"] = ""
        r = subprocess.run([a.binary, "serve", "--addr", "127.0.0.1:0", "--metrics-addr", "off",
                            "--uds", str(tmp / "none.sock"), "--device", "cuda:0"],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode != 0 and "--device cuda:0" in r.stderr, r.stderr[-1000:]
        return {"message": r.stderr.strip().splitlines()[-1][:300]}

    results["ok"] = all(c["ok"] for c in checks.values())
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v.get("ok") for k, v in checks.items()}))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
