#!/usr/bin/env python3
"""Issue 18: what one GetBatch costs beyond the wire, client variants side by side.

    python3 bench/percall.py [--bin target/release/minibatchd] [--file bench/out/mnist-full.pkl.gz]
                             [--rounds 7] [--count 2000] [--size 500] [--busy-poll-us 2000]
                             [--variants rust,rust-busypoll,python,python-busypoll]

One minibatchd serves the file on loopback. Each round measures raw TCP
(iperf3 -t 1, one stream), then runs every variant once, in an order that
alternates between rounds (so drift on a shared machine hits all alike), each
a fresh client process fetching `count` GetBatch(size) one at a time:

  rust             `minibatchd bench --count N` (the Rust client)
  rust-busypoll    the same with `--busy-poll-us` (opt-in busy polling)
  python           minibatch_client.Client.get_batch in a loop (native transport)
  python-busypoll  the same with MINIBATCH_CLIENT_BUSY_POLL_US

Per run: p50 latency and MB/s from the client, and counts taken around it:
the client's CPU time and context switches (rusage: of the whole Rust
client process, of the Python loop alone), the server's CPU time and context switches (/proc/PID/stat and
/proc/PID/task/*/status) per minibatch, and the ratios to the TCP of that
round (MB/s / TCP, p50 / wire floor). Prints medians over rounds with
(min-max), and the command.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

PY_LOOP = r"""
import sys, time, json, resource
sys.path.insert(0, sys.argv[1])
from minibatch_client import Client
addr, n, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = Client(addr)
for i in range(50):
    c.get_batch("train", i % 100, size)
ts = []
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
nbytes = 0
for i in range(n):
    t = time.perf_counter()
    x, y = c.get_batch("train", i % 100, size)
    ts.append(time.perf_counter() - t)
    nbytes += x.nbytes + y.nbytes
el = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
ts.sort()
print(json.dumps({"p50_ms": ts[len(ts) // 2] * 1e3, "mb_per_s": nbytes / el / 1e6, "minibatches": n,
                  "cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
                  "cs": r1.ru_nvcsw + r1.ru_nivcsw - r0.ru_nvcsw - r0.ru_nivcsw}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_counts(pid: int) -> tuple[float, int]:
    """(CPU seconds, context switches) of every thread of `pid` so far."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    cs = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (t / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    cs += int(line.split()[1])
        except OSError:
            pass
    return cpu, cs


def run_client(cmd: list[str], env: dict) -> tuple[str, float, int]:
    """Runs a client; returns (stdout, CPU seconds, context switches) of it."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {p.returncode}")
    return out, ru.ru_utime + ru.ru_stime, ru.ru_nvcsw + ru.ru_nivcsw


def tcp() -> float:
    port = free_port()
    srv = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "1", "-J"],
                       capture_output=True, text=True)
    srv.wait(10)
    return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "minibatchd"))
    ap.add_argument("--client-bin", help="minibatchd binary for the Rust client (default: --bin)")
    ap.add_argument("--file", default=str(ROOT / "bench" / "out" / "mnist-full.pkl.gz"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--size", type=int, default=500)
    ap.add_argument("--busy-poll-us", type=int, default=2000)
    ap.add_argument("--variants", default="rust,rust-busypoll,python,python-busypoll")
    ap.add_argument("--pythonpath", default=str(ROOT / "clients" / "python"),
                    help="where minibatch_client is imported from")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    variants = a.variants.split(",")
    client_bin = a.client_bin or a.bin
    if not shutil.which("iperf3"):
        raise SystemExit("needs iperf3")
    port = free_port()
    addr = f"127.0.0.1:{port}"
    srv = subprocess.Popen([a.bin, "--log", "warn", "serve", "--data", a.file, "--addr", addr,
                            "--metrics-addr", "off"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or srv.poll() is not None:
                    raise SystemExit("minibatchd did not start")
                time.sleep(0.05)
        time.sleep(1.0)  # background row CRCs
        res: dict[str, list[dict]] = {v: [] for v in variants}
        tcps = []
        for r in range(a.rounds):
            t_bps = tcp()
            tcps.append(t_bps)
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                env = dict(os.environ)
                spin = a.busy_poll_us if v.endswith("-busypoll") else 0
                if v.startswith("rust"):
                    cmd = [client_bin, "--log", "warn", "bench", "--server", addr, "--size", str(a.size),
                           "--count", str(a.count), "--json", "--busy-poll-us", str(spin)]
                    if not spin:
                        cmd = cmd[:-2]
                else:
                    env["MINIBATCH_CLIENT_BUSY_POLL_US"] = str(spin)
                    cmd = [PY, "-c", PY_LOOP, a.pythonpath, addr, str(a.count), str(a.size)]
                s0 = server_counts(srv.pid)
                out, ccpu, ccs = run_client(cmd, env)
                s1 = server_counts(srv.pid)
                j = json.loads(out.strip().splitlines()[-1])
                n = j["minibatches"]
                if "cpu_s" in j:  # the Python loop's own, without interpreter start-up and warm-up
                    ccpu, ccs = j["cpu_s"], j["cs"]
                res[v].append({"p50_ms": j["p50_ms"], "mb_per_s": j["mb_per_s"], "tcp_bytes_per_s": t_bps,
                               "x_tcp": j["mb_per_s"] * 1e6 / t_bps,
                               "client_cpu_us": ccpu / n * 1e6, "client_cs": ccs / n,
                               "server_cpu_us": (s1[0] - s0[0]) / n * 1e6, "server_cs": (s1[1] - s0[1]) / n})
                print(f"round {r + 1} {v}: p50 {j['p50_ms']:.3f} ms, {j['mb_per_s']:,.0f} MB/s, "
                      f"TCP {t_bps / 1e6:,.0f} MB/s", file=sys.stderr, flush=True)
    finally:
        srv.terminate()
        srv.wait(10)
    payload = a.size * (784 * 4 + 8)

    def cell(v, key, nd):
        xs = [m[key] for m in res[v]]
        return f"{statistics.median(xs):,.{nd}f} ({min(xs):,.{nd}f}–{max(xs):,.{nd}f})"

    print(f"GetBatch({a.size}), {a.count} calls per run, {a.rounds} rounds; medians (min–max) over rounds; "
          f"raw TCP (iperf3 -t 1, before each round) {statistics.median(tcps) / 1e6:,.0f} MB/s "
          f"({min(tcps) / 1e6:,.0f}–{max(tcps) / 1e6:,.0f}); busy poll {a.busy_poll_us} µs; load average "
          f"{os.getloadavg()[0]:.2f} at the end")
    print()
    print("| client | p50 ms | MB/s | × TCP | p50 / wire floor | client CPU µs/call | client ctx sw/call "
          "| server CPU µs/call | server ctx sw/call |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for v in variants:
        for m in res[v]:
            m["x_floor"] = m["p50_ms"] / (payload / m["tcp_bytes_per_s"] * 1e3)
        print(f"| {v} | {cell(v, 'p50_ms', 3)} | {cell(v, 'mb_per_s', 0)} | {cell(v, 'x_tcp', 2)} | "
              f"{cell(v, 'x_floor', 2)} | {cell(v, 'client_cpu_us', 0)} | {cell(v, 'client_cs', 1)} | "
              f"{cell(v, 'server_cpu_us', 0)} | {cell(v, 'server_cs', 1)} |")
    print()
    print("command: `python3 " + " ".join(["bench/percall.py", *sys.argv[1:]]) + "`")
    if a.json:
        a.json.write_text(json.dumps({"tcp": tcps, "runs": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
