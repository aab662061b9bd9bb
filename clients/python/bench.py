#!/usr/bin/env python3
"""Measures the Python client against a running minibatchd (loopback).

    python clients/python/bench.py --server 127.0.0.1:50051 [--size 500 --count 300 --repeat 3]

For each variant: `count` minibatches of `size` examples of float32 x + int64 y
(1,572,000 bytes at size 500), `repeat` runs after a warm-up; prints the median
MB/s (payload bytes of x and y) and the median per-minibatch latency.

Variants:
  raw              Client.get_batch: raw message bytes + the minimal field
                   reader, grpcio's SingleThreadedUnaryStream (the default)
  raw-multithread  the same without SingleThreadedUnaryStream
  raw-frame512k    also advertising a 512 KiB HTTP/2 max frame size
  protobuf         the same calls with protobuf decoding (TensorChunk.FromString),
                   chunk data copied into one preallocated buffer, CRC checked
                   (SingleThreadedUnaryStream; -multithread without)
  epoch-p0/p2      Client.epoch (one StreamBatches call), prefetch 0 / 2,
                   multi-threaded grpcio (the default for streams)
  epoch-*-single   the same with SingleThreadedUnaryStream

Variants run in rounds (each once per round), `repeat` rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minibatch_client import Client  # noqa: E402
from minibatch_client._crc32c import crc32c  # noqa: E402
from minibatch_client._proto import minibatch_pb2 as pb  # noqa: E402
from minibatch_client.client import SINGLE_THREADED as SINGLE  # noqa: E402
from minibatch_client.errors import ChecksumError  # noqa: E402


def pb_getter(server: str, options):
    ch = grpc.insecure_channel(server, options=options)
    call = ch.unary_stream("/minibatch.v1.BatchService/GetBatch",
                           request_serializer=lambda m: m.SerializeToString(),
                           response_deserializer=pb.TensorChunk.FromString)

    def get(set_, index, size):
        out = {}
        for c in call(pb.GetBatchRequest(set=set_, index=index, size=size)):
            d = c.data
            if crc32c(d) != c.crc32c:
                raise ChecksumError("crc")
            if c.offset == 0:
                out[c.name] = np.empty(c.total_bytes, np.uint8)
            out[c.name][c.offset:c.offset + len(d)] = np.frombuffer(d, np.uint8)
        return out["x"], out["y"]
    get.channel = ch  # a channel closes when its last reference goes
    return get


def measure(fetch_all, count, batch_bytes):
    t = time.perf_counter()
    n = fetch_all(count)
    dt = time.perf_counter() - t
    return n * batch_bytes / dt / 1e6, dt / n * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="127.0.0.1:50051")
    ap.add_argument("--set", default="train")
    ap.add_argument("--size", type=int, default=500)
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="variants to run (default: all)")
    a = ap.parse_args()

    probe = Client(a.server)
    info = probe.info()
    nb = probe.num_batches(a.set, a.size)
    x, y = probe.get_batch(a.set, 0, a.size)
    batch_bytes = x.nbytes + y.nbytes
    print(f"server {a.server}: {info.source}, {a.set} has {info.sets[a.set].examples} examples = {nb} minibatches "
          f"of {a.size}; {batch_bytes:,} bytes each; crc32c backend: "
          f"{__import__('minibatch_client._crc32c', fromlist=['x']).BACKEND}")

    def getbatch_loop(get):
        def f(n):
            for i in range(n):
                get(a.set, i % nb, a.size)
            return n
        return f

    def epoch_loop(client, prefetch):
        def f(n):
            got = 0
            while got < n:
                with client.epoch(a.set, a.size, prefetch=prefetch, count=min(nb, n - got)) as it:
                    for _ in it:
                        got += 1
            return got
        return f

    base = [("grpc.max_receive_message_length", -1)]
    frame = [("grpc.http2.max_frame_size", 512 * 1024)]
    variants = {
        "raw": lambda: getbatch_loop(Client(a.server).get_batch),
        "raw-multithread": lambda: getbatch_loop(Client(a.server, single_threaded_get_batch=False).get_batch),
        "raw-frame512k": lambda: getbatch_loop(Client(a.server, options=frame).get_batch),
        "protobuf": lambda: getbatch_loop(pb_getter(a.server, base + [SINGLE])),
        "protobuf-multithread": lambda: getbatch_loop(pb_getter(a.server, base)),
        "epoch-p0": lambda: epoch_loop(Client(a.server), 0),
        "epoch-p2": lambda: epoch_loop(Client(a.server), 2),
        "epoch-p0-single": lambda: epoch_loop(Client(a.server, single_threaded_stream=True), 0),
        "epoch-p2-single": lambda: epoch_loop(Client(a.server, single_threaded_stream=True), 2),
    }
    chosen = {k: v() for k, v in variants.items() if not a.only or k in a.only}
    for f in chosen.values():
        f(min(a.count, 20))  # warm-up: connection, first allocations
    results = {k: [] for k in chosen}
    # Rounds of every variant in turn, so drift on a shared machine hits all alike.
    for _ in range(a.repeat):
        for k, f in chosen.items():
            results[k].append(measure(f, a.count, batch_bytes))
    for k, rs in results.items():
        rates = [r for r, _ in rs]
        print(f"{k:24s} {statistics.median(rates):7.0f} MB/s   {statistics.median(l for _, l in rs):6.2f} ms/minibatch"
              f"   runs: {', '.join(f'{r:.0f}' for r in rates)} MB/s", flush=True)

if __name__ == "__main__":
    main()
