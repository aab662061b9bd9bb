#!/usr/bin/env python3
"""One Python client process of the benchmark (bench/harness.py starts 1, 2 or 8).

    python bench/pyclient.py --kind minibatchd|flight|plain --addr 127.0.0.1:P
        [--method get|epoch] [--set train] [--size 500] [--examples N]
        [--duration S | --count N | --epochs E] [--x-dtype uint8] [--worker 0] [--sync]

Every kind hands the caller numpy arrays, x [rows, 784] and y [rows], as a
trainer would use them:
  minibatchd  minibatch_client.Client (clients/python, from this checkout):
              get_batch(set, index, size, x_dtype=...) / epoch(set, size, x_dtype=...)
              with its defaults (CRC-32C checked, prefetch 2 for epochs)
  flight      pyarrow.flight.FlightClient.do_get(Ticket("set:index:size")).read_all(),
              columns to numpy without a copy; epochs: one do_get of "set:epoch:size"
  plain       the plain grpcio stub of bench/plain.proto, np.frombuffer on x and y

get fetches minibatches one by one, index w, w+1, ... (w = --worker) modulo
ceil(examples / size), as `minibatchd bench` does. epoch runs whole epochs
(StreamBatches / one do_get) until --epochs or --duration is reached.

After a short warm-up (connection, first allocations) the worker, with
--sync, prints "READY" and waits for a line on stdin, so that concurrent
workers start together; then it measures and prints
one JSON line: minibatches, payload bytes (x.nbytes + y.nbytes, the wire
dtype's), start and end times, and every per-minibatch latency in ms
(get: the call; epoch: the time between consecutive minibatches).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_getter(a):
    """(get(index) -> (x, y), epoch() -> iterator of (x, y))"""
    if a.kind == "minibatchd":
        sys.path.insert(0, str(ROOT / "clients" / "python"))  # this checkout's client
        from minibatch_client import Client

        c = Client(a.addr)

        def get(i):
            return c.get_batch(a.set, i, a.size, x_dtype=a.x_dtype)

        def epoch():
            with c.epoch(a.set, a.size, x_dtype=a.x_dtype) as it:
                yield from it

        return get, epoch

    if a.kind == "flight":
        import pyarrow.flight as flight

        c = flight.FlightClient(f"grpc://{a.addr}")
        if a.x_dtype:
            raise SystemExit("flight serves float32 only")

        def arrays(b):
            x = b.column(0)
            return x.flatten().to_numpy().reshape(len(x), -1), b.column(1).to_numpy()

        def get(i):
            t = c.do_get(flight.Ticket(f"{a.set}:{i}:{a.size}".encode())).read_all()
            b = t.combine_chunks().to_batches()[0] if t.column(0).num_chunks != 1 else t.to_batches()[0]
            return arrays(b)

        def epoch():
            r = c.do_get(flight.Ticket(f"{a.set}:epoch:{a.size}".encode()))
            for chunk in r:
                yield arrays(chunk.data)

        return get, epoch

    if a.kind == "plain":
        import grpc

        sys.path.insert(0, a.gen)
        import plain_pb2
        import plain_pb2_grpc

        ch = grpc.insecure_channel(a.addr, options=[("grpc.max_receive_message_length", -1)])
        stub = plain_pb2_grpc.BatchesStub(ch)
        if a.x_dtype:
            raise SystemExit("the plain peer serves float32 only")

        def get(i):
            r = stub.GetBatch(plain_pb2.BatchRequest(set=a.set, index=i, size=a.size))
            return np.frombuffer(r.x, np.float32).reshape(r.rows, -1), np.frombuffer(r.y, np.int64)

        def epoch():
            raise SystemExit("the plain peer has no epoch stream")

        return get, epoch

    raise SystemExit(f"unknown kind {a.kind}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", required=True, choices=["minibatchd", "flight", "plain"])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--method", default="get", choices=["get", "epoch"])
    ap.add_argument("--set", default="train")
    ap.add_argument("--size", type=int, default=500)
    ap.add_argument("--examples", type=int, required=True, help="examples in the set")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--count", type=int, default=0, help="get: stop after this many minibatches (0: --duration)")
    ap.add_argument("--epochs", type=int, default=0, help="epoch: stop after this many epochs (0: --duration)")
    ap.add_argument("--x-dtype", default=None)
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--sync", action="store_true", help="print READY after the warm-up, start on a stdin line")
    ap.add_argument("--gen", default=str(ROOT / "bench" / "out" / "gen"))
    a = ap.parse_args()

    get, epoch = make_getter(a)
    nb = max(1, -(-a.examples // a.size))
    # warm-up: the connection and the first allocations
    if a.method == "get":
        for i in range(3):
            get((a.worker + i) % nb)
    else:
        it = epoch()
        next(it)
        it.close()
    if a.sync:
        print("READY", flush=True)
        sys.stdin.readline()

    lat: list[float] = []
    nbytes = 0
    t_start = time.time()
    t0 = time.perf_counter()
    end = t0 + a.duration
    if a.method == "get":
        i = a.worker % nb
        while True:
            s = time.perf_counter()
            x, y = get(i)
            e = time.perf_counter()
            lat.append((e - s) * 1e3)
            nbytes += x.nbytes + y.nbytes
            i = (i + 1) % nb
            if (a.count and len(lat) >= a.count) or (not a.count and e >= end):
                break
    else:
        epochs = 0
        while True:
            s = time.perf_counter()
            for x, y in epoch():
                e = time.perf_counter()
                lat.append((e - s) * 1e3)
                nbytes += x.nbytes + y.nbytes
                s = e
            epochs += 1
            if (a.epochs and epochs >= a.epochs) or (not a.epochs and time.perf_counter() >= end):
                break
    secs = time.perf_counter() - t0
    print(json.dumps({"minibatches": len(lat), "bytes": nbytes, "seconds": secs, "t_start": t_start,
                      "t_end": t_start + secs, "lat_ms": [round(v, 4) for v in lat]}), flush=True)


if __name__ == "__main__":
    main()
