#!/usr/bin/env python3
"""The two peers minibatchd is measured against (bench/harness.py starts them).

    python bench/peers.py flight --data FILE --port P
    python bench/peers.py plain  --data FILE --port P --gen bench/out/gen

Both load FILE the way the tutorial does, `pickle.load(gzip.open(FILE),
encoding='latin1')`, listen on 127.0.0.1 only, print "READY <port>" on stdout
once they answer, and run until SIGTERM.

flight  Apache Arrow Flight (pyarrow.flight): each set held as one record batch
        (x: fixed_size_list<float32>[784], y: int64). do_get on the ticket
        "set:index:size" returns a zero-copy slice of it (RecordBatch.slice);
        the ticket "set:epoch:size" streams the whole set as consecutive slices
        of `size` rows in one do_get (the peer of StreamBatches).
plain   a plain grpcio server, as a user might write in an afternoon
        (bench/plain.proto): GetBatch(set, index, size) -> Batch{x, y} with the
        rows as bytes (numpy slice .tobytes()), one unary message, message size
        limits lifted, a thread pool of 8.
"""
from __future__ import annotations

import argparse
import gzip
import pickle
import signal
import sys
from concurrent import futures

import numpy as np

NAMES = ("train", "valid", "test")


def load(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with gzip.open(path, "rb") as f:
        sets = pickle.load(f, encoding="latin1")
    return {n: (np.ascontiguousarray(s[0]), np.ascontiguousarray(s[1])) for n, s in zip(NAMES, sets)}


def serve_flight(data, port: int) -> None:
    import pyarrow as pa
    import pyarrow.flight as flight

    batches = {}
    for name, (x, y) in data.items():
        xs = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        batches[name] = pa.RecordBatch.from_arrays([xs, pa.array(y)], names=["x", "y"])

    class Server(flight.FlightServerBase):
        def do_get(self, context, ticket):
            set_, index, size = ticket.ticket.decode().split(":")
            b = batches.get(set_)
            if b is None:
                raise flight.FlightServerError(f"unknown set {set_!r}")
            size = int(size)
            if index == "epoch":
                parts = [b.slice(o, size) for o in range(0, b.num_rows, size)]
                return flight.RecordBatchStream(pa.RecordBatchReader.from_batches(b.schema, parts))
            start = int(index) * size
            if start >= b.num_rows:
                raise flight.FlightServerError(f"minibatch {index} of size {size} is past the end")
            return flight.RecordBatchStream(pa.RecordBatchReader.from_batches(b.schema, [b.slice(start, size)]))

    server = Server(f"grpc://127.0.0.1:{port}")
    print(f"READY {server.port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    server.serve()


def serve_plain(data, port: int, gen: str) -> None:
    import grpc

    sys.path.insert(0, gen)
    import plain_pb2
    import plain_pb2_grpc

    class Batches(plain_pb2_grpc.BatchesServicer):
        def GetBatch(self, request, context):
            if request.set not in data:
                context.abort(grpc.StatusCode.NOT_FOUND, f"unknown set {request.set!r}")
            x, y = data[request.set]
            lo = request.index * request.size
            if request.size == 0 or lo >= len(x):
                context.abort(grpc.StatusCode.OUT_OF_RANGE, "past the end")
            hi = lo + request.size
            xs, ys = x[lo:hi], y[lo:hi]
            return plain_pb2.Batch(x=xs.tobytes(), y=ys.tobytes(), rows=len(xs))

    opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=opts)
    plain_pb2_grpc.add_BatchesServicer_to_server(Batches(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"READY {bound}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(1))
    server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["flight", "plain"])
    ap.add_argument("--data", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--gen", default="bench/out/gen", help="folder with plain_pb2*.py (plain only)")
    a = ap.parse_args()
    data = load(a.data)
    if a.kind == "flight":
        serve_flight(data, a.port)
    else:
        serve_plain(data, a.port, a.gen)


if __name__ == "__main__":
    main()
