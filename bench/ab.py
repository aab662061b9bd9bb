#!/usr/bin/env python3
"""Two minibatchd binaries side by side, alternately, on the same file.

    bench/ab.py OLD_BIN NEW_BIN [--file mnist-full.pkl.gz] [--rounds 5] [--seconds 3]

Both daemons serve the same dataset at once (each on its own port; an idle
daemon costs nothing); each round runs every test against the old one, then
the new one, with NEW_BIN's `bench` load generator as the client (the same
client for both), so drift in the machine's speed during the run hits both
alike. Prints, per test, the median MB/s and p50 of each and the spread over
rounds (min..max), and new/old as a ratio. Made for "no regression beyond
noise" checks of a server change (issue 11's done-when).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TESTS = [
    ("GetBatch(500) float32", ["--method", "get-batch", "--size", "500"]),
    ("GetBatch(500) float32 shuffled", ["--method", "get-batch", "--size", "500", "--shuffle"]),
    ("GetBatch(500) uint8", ["--method", "get-batch", "--size", "500", "--x-dtype", "uint8"]),
    ("epoch, size 500, float32", ["--method", "stream-batches", "--size", "500"]),
    ("epoch, size 500, shuffled", ["--method", "stream-batches", "--size", "500", "--shuffle"]),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary: str, data: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    p = subprocess.Popen(
        [binary, "serve", "--addr", addr, "--metrics-addr", "off", "--data", data, "--no-pin"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        r = subprocess.run([binary, "health", "--server", addr], capture_output=True)
        if r.returncode == 0:
            return p, addr
        time.sleep(0.1)
    p.kill()
    sys.exit(f"{binary} did not become healthy on {addr}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--file", default=str(ROOT / "bench" / "out" / "mnist-full.pkl.gz"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--only", default="", help="run only the tests whose name contains this")
    a = ap.parse_args()
    tests = [t for t in TESTS if a.only in t[0]]
    if not Path(a.file).exists():
        sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "scripts")]
        import load  # bench/load.py

        print(f"making {a.file} (bundled digits repeated to 50,000 / 10,000 / 10,000)", file=sys.stderr)
        load.make_full(Path(a.file))
    servers = {"old": start(a.old, a.file), "new": start(a.new, a.file)}
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        for r in range(a.rounds):
            for name, args in tests:
                for who in ("old", "new"):
                    out = subprocess.run(
                        [a.new, "bench", "--server", servers[who][1], "--duration", str(a.seconds), "--json", *args],
                        capture_output=True, text=True, check=True,
                    )
                    results.setdefault((name, who), []).append(json.loads(out.stdout))
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    finally:
        for p, _ in servers.values():
            p.terminate()
            p.wait()
    only = f" --only '{a.only}'" if a.only else ""
    print(f"\n`bench/ab.py {a.old} {a.new} --rounds {a.rounds} --seconds {a.seconds}{only}`, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs; medians over rounds (min..max)\n")
    print("| test | old MB/s | new MB/s | new/old | old p50 ms | new p50 ms |")
    print("|---|--:|--:|--:|--:|--:|")
    for name, _ in tests:
        o, n = results[(name, "old")], results[(name, "new")]

        def col(rs: list[dict], k: str, fmt: str) -> str:
            v = [x[k] for x in rs]
            return f"{statistics.median(v):{fmt}} ({min(v):{fmt}}..{max(v):{fmt}})"

        ratio = statistics.median(x["mb_per_s"] for x in n) / statistics.median(x["mb_per_s"] for x in o)
        print(f"| {name} | {col(o, 'mb_per_s', ',.0f')} | {col(n, 'mb_per_s', ',.0f')} | {ratio:.2f} "
              f"| {col(o, 'p50_ms', '.3f')} | {col(n, 'p50_ms', '.3f')} |")


if __name__ == "__main__":
    main()
