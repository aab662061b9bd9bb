#!/usr/bin/env python3
"""Issue 18: the floor of a request/response on loopback TCP, no HTTP/2, no CRC.

    python3 bench/tcp_rpc.py [--bytes 1572000] [--count 2000] [--rounds 5] [--source-mb 0]

A server process answers each 80-byte request with `bytes` bytes (one
sendall): from one buffer, which stays in the CPU caches as iperf3's does, or
with --source-mb M from consecutive slices of an M MB buffer, as minibatchd
sends consecutive minibatches of its resident dataset (read from memory, not
cache); the client sends the request and recv_into's the answer
into one preallocated buffer, `count` times per round, one call at a time, as
`minibatchd bench` does GetBatch. TCP_NODELAY on both ends. Each round also
measures iperf3 -t 1 (one stream), so the table gives both: what streaming
TCP moves, and what one request/response of a minibatch's size can reach on
this machine. GetBatch's ratio to iperf3 is bounded by this one's.
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


def serve(sock: socket.socket, nbytes: int, source_mb: int) -> None:
    c, _ = sock.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    slices = max(1, source_mb * 1_000_000 // nbytes)
    source = memoryview(bytearray(b"\x01" * (nbytes * slices)))
    i = 0
    while True:
        req = c.recv(80)
        if not req:
            return
        c.sendall(source[i * nbytes:(i + 1) * nbytes])
        i = (i + 1) % slices


def iperf3() -> float:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    srv = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "1", "-J"], capture_output=True, text=True)
    srv.wait(10)
    return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", type=int, default=500 * (784 * 4 + 8))
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--source-mb", type=int, default=0,
                    help="answer from consecutive slices of a buffer this large (0: one cached buffer)")
    a = ap.parse_args()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    pid = os.fork()
    if pid == 0:
        serve(ls, a.bytes, a.source_mb)
        os._exit(0)
    c = socket.create_connection(ls.getsockname())
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(a.bytes))
    req = b"r" * 80

    def call() -> None:
        c.sendall(req)
        got = 0
        while got < a.bytes:
            n = c.recv_into(buf[got:])
            if not n:
                raise SystemExit("server closed")
            got += n

    for _ in range(50):
        call()
    rows = []
    for r in range(a.rounds):
        tcp = iperf3()
        lat = []
        t0 = time.perf_counter()
        for _ in range(a.count):
            t = time.perf_counter()
            call()
            lat.append(time.perf_counter() - t)
        el = time.perf_counter() - t0
        lat.sort()
        mbs = a.count * a.bytes / el / 1e6
        rows.append({"tcp": tcp / 1e6, "mb_per_s": mbs, "p50_ms": lat[len(lat) // 2] * 1e3,
                     "x_tcp": mbs / (tcp / 1e6), "x_floor": lat[len(lat) // 2] / (a.bytes / tcp)})
        print(f"round {r + 1}: iperf3 {tcp / 1e6:,.0f} MB/s; request/response {mbs:,.0f} MB/s, "
              f"p50 {rows[-1]['p50_ms']:.3f} ms", file=sys.stderr, flush=True)
    c.close()
    os.waitpid(pid, 0)

    def cell(k, nd):
        xs = [x[k] for x in rows]
        return f"{statistics.median(xs):,.{nd}f} ({min(xs):,.{nd}f}–{max(xs):,.{nd}f})"

    src = f"from a {a.source_mb} MB buffer in turn" if a.source_mb else "from one cached buffer"
    print(f"raw TCP request/response of {a.bytes:,} bytes {src}, {a.count} calls per round, {a.rounds} rounds, "
          f"medians (min–max); load average {os.getloadavg()[0]:.2f} at the end")
    print()
    print("| iperf3 MB/s | request/response MB/s | × iperf3 | p50 ms | p50 / wire floor |")
    print("|--:|--:|--:|--:|--:|")
    print(f"| {cell('tcp', 0)} | {cell('mb_per_s', 0)} | {cell('x_tcp', 2)} | {cell('p50_ms', 3)} | "
          f"{cell('x_floor', 2)} |")
    print()
    print("command: `python3 " + " ".join(["bench/tcp_rpc.py", *sys.argv[1:]]) + "`")


if __name__ == "__main__":
    main()
