#!/usr/bin/env python3
"""The cost of the client's wait accounting (minibatch_client.stats, issue 16).

    python3 bench/wait_cost.py [--file DATA] [--rounds 11] [--calls 400] [--transport native|grpcio] [--json out.json]

One daemon (serving the bundled sample unless --file; TCP and --uds);
clients of the same transport, one with `stats=True` and one with
`stats=False` (what MINIBATCH_CLIENT_STATS=0 gives). Each round makes
`--calls` pairs of GetBatch("train", i, 500), one call on each client,
the order alternating pair by pair (on a shared machine the load changes
within a fraction of a second: neighbouring calls see the same), timing
each call; a round's figure per side is the median call. The same for
attached `batch("train", i, 500)` (a zero-copy view: the path where a fixed
cost weighs most), and a control row of two clients both with stats off
(A/A: what "no difference" looks like on this machine now). Prints, per
path, the median over rounds with their spread (min..max) and the median of
the per-round differences; and the meter's own cost (start + stop, no I/O)
from a tight loop. The accounting is within noise when its difference is
no larger than the control's and inside the spread of either side.

Needs a built minibatchd ($MINIBATCHD, else target/release, else
target/debug).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients" / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import minibatch_client as mc  # noqa: E402
from minibatch_client import stats  # noqa: E402
from harness import find_binary, free_port, health  # noqa: E402

SIZE = 500


def paired_round(n: int, on, off) -> tuple[float, float]:
    """n pairs of calls on(i), off(i), in alternating order; the median
    microseconds of each side's calls."""
    now = time.perf_counter
    t_on, t_off = [], []
    for i in range(n):
        if i % 2:
            t0 = now(); on(i); t1 = now(); off(i); t2 = now()  # noqa: E702
            t_on.append(t1 - t0)
            t_off.append(t2 - t1)
        else:
            t0 = now(); off(i); t1 = now(); on(i); t2 = now()  # noqa: E702
            t_off.append(t1 - t0)
            t_on.append(t2 - t1)
    return statistics.median(t_on) * 1e6, statistics.median(t_off) * 1e6


def meter_cost_ns(n: int = 200_000) -> dict:
    """ns per start()+stop(minibatch=True) of a live meter, and of the null one."""
    out = {}
    for name, m in (("on", stats.WaitMeter()), ("off", stats.NULL_METER)):
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                m.stop(m.start(), 1000, minibatch=True)
            runs.append((time.perf_counter() - t0) / n * 1e9)
        out[name] = statistics.median(runs)
    return out


def compare(rounds: int, calls: int, on, off) -> dict:
    """`rounds` rounds of `calls` interleaved pairs through on(i) and off(i)."""
    r_on, r_off = [], []
    for _ in range(rounds):
        a, b = paired_round(calls, on, off)
        r_on.append(a)
        r_off.append(b)
    diff = [a - b for a, b in zip(r_on, r_off)]
    return {"on_us": r_on, "off_us": r_off, "diff_us": diff,
            "on_median": statistics.median(r_on), "off_median": statistics.median(r_off),
            "diff_median": statistics.median(diff)}


def row(name: str, c: dict) -> str:
    on, off = c["on_us"], c["off_us"]
    rel = 100 * c["diff_median"] / c["off_median"] if c["off_median"] else 0.0
    return (f"| {name} | {c['on_median']:.1f} ({min(on):.1f}..{max(on):.1f}) | "
            f"{c['off_median']:.1f} ({min(off):.1f}..{max(off):.1f}) | {c['diff_median']:+.2f} ({rel:+.1f} %) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", help="dataset to serve (default: the bundled sample)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--calls", type=int, default=400, help="calls per round and side")
    ap.add_argument("--transport", choices=["native", "grpcio"], help="default: native where installed")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="wait-cost-"))
    sock = tmp / "minibatchd.sock"
    addr = f"127.0.0.1:{free_port()}"
    cmd = [find_binary(), "--log", "warn", "serve", "--addr", addr, "--metrics-addr", "off", "--uds", str(sock)]
    if a.file:
        cmd += ["--data", a.file]
    log = open(tmp / "minibatchd.log", "wb")
    daemon = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (health(addr) and sock.exists()):
            if daemon.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"minibatchd did not start; see {tmp / 'minibatchd.log'}")
            time.sleep(0.01)
        native = {"native": True, "grpcio": False}.get(a.transport or "")
        with mc.Client(addr, native=native, stats=True) as c_on, mc.Client(addr, native=native, stats=False) as c_off, \
                mc.Client(addr, native=native, stats=False) as c_ctl, \
                mc.attach.connect("unix://" + str(sock), stats=True) as a_on, \
                mc.attach.connect("unix://" + str(sock), stats=False) as a_off:
            nb = c_on.num_batches("train", SIZE)
            for c in (c_on, c_off, c_ctl):  # GetInfo read, connections up
                for i in range(20):
                    c.get_batch("train", i % nb, SIZE)
            grpc_cmp = compare(a.rounds, a.calls, lambda i: c_on.get_batch("train", i % nb, SIZE),
                               lambda i: c_off.get_batch("train", i % nb, SIZE))
            ctl_cmp = compare(a.rounds, a.calls, lambda i: c_ctl.get_batch("train", i % nb, SIZE),
                              lambda i: c_off.get_batch("train", i % nb, SIZE))
            att_cmp = compare(a.rounds, a.calls * 10, lambda i: a_on.batch("train", i % nb, SIZE),
                              lambda i: a_off.batch("train", i % nb, SIZE))
            transport = c_on.transport
            assert c_on.stats().minibatches > 0 and c_off.stats().minibatches == 0
        meter = meter_cost_ns()
    finally:
        daemon.terminate()
        daemon.wait(30)
        log.close()

    command = " ".join(shlex.quote(x) for x in [Path(sys.executable).name, "bench/wait_cost.py", *sys.argv[1:]])
    print(f"$ {command}")
    print(f"{a.rounds} rounds, alternating; GetBatch({SIZE}) on the {transport} transport, {a.calls} calls a round "
          f"and side; attached batch() {a.calls * 10}; {a.file or 'the bundled sample'}\n")
    print("| path | stats on: us/call median (min..max) | stats off | on - off, median of rounds |")
    print("|---|---|---|---|")
    print(row(f"GetBatch({SIZE}) {transport}", grpc_cmp))
    print(row(f"control: GetBatch({SIZE}), off vs off", ctl_cmp))
    print(row(f"attach batch({SIZE})", att_cmp))
    print(f"\nmeter alone (start + stop, no I/O): {meter['on']:.0f} ns on, {meter['off']:.0f} ns off")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": command, "transport": transport, "rounds": a.rounds, "calls": a.calls,
                       "get_batch": grpc_cmp, "control_off_off": ctl_cmp, "attach_batch": att_cmp,
                       "meter_ns": meter}, f, indent=1)


if __name__ == "__main__":
    main()
