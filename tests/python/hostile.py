"""A real gRPC server (grpcio, 127.0.0.1:0) that plays a broken or hostile
minibatchd: GetInfo describes a small dataset (SETS), and GetBatch and
StreamBatches answer with whatever raw TensorChunk messages a test scripts.
Import it after putting clients/python on sys.path (as the tests do).

The server counts what it managed to send. A scripted stream may be endless;
the server itself stops it at a safety cap (so that a client that fails to
cut it costs the test machine a bounded amount of memory and time), and
`hit_cap` then says the client did not cut it.
"""
from __future__ import annotations

import threading
from concurrent import futures
from typing import Callable, Iterable, Iterator

import grpc
import numpy as np

from minibatch_client._crc32c import crc32c
from minibatch_client._proto import minibatch_pb2 as pb

#: what GetInfo describes: name -> (examples, x example shape, x dtype, y dtype)
SETS = {
    # tiny, for malformed streams: x float32 [n, 4], y int64 [n]
    "train": (2, (4,), pb.DTYPE_FLOAT32, pb.DTYPE_INT64),
    # 256 KiB per example, so that a minibatch of 4 is 1 MiB of x: endless
    # streams of whole messages reach the safety cap in a few hundred of them
    "big": (1000, (1 << 16,), pb.DTYPE_FLOAT32, pb.DTYPE_INT64),
    # like train, with room for many small minibatches
    "many": (100, (4,), pb.DTYPE_FLOAT32, pb.DTYPE_INT64),
}
MAX_MESSAGE_BYTES = 4 << 20

#: endless streams stop here (bytes of messages, and messages)
CAP_BYTES = 256 << 20
CAP_MESSAGES = 100_000


def dataset_info() -> pb.DatasetInfo:
    sets = [pb.SetInfo(name=name, examples=n, x=pb.TensorInfo(dtype=xd, shape=list(shape), wire_dtypes=[xd]),
                       y=pb.TensorInfo(dtype=yd, wire_dtypes=[yd]))
            for name, (n, shape, xd, yd) in SETS.items()]
    return pb.DatasetInfo(source="hostile", format="test", fingerprint="0" * 64, sets=sets,
                          server_version="hostile",
                          limits=pb.Limits(max_batch_size=1000, max_message_bytes=MAX_MESSAGE_BYTES,
                                           chunk_bytes=1 << 20))


def chunk(**kw) -> bytes:
    """A serialized TensorChunk; crc32c defaults to the right one for `data`."""
    kw.setdefault("crc32c", crc32c(kw.get("data", b"")))
    return pb.TensorChunk(**kw).SerializeToString()


def minibatch(set_: str, index: int, size: int, *, chunk_bytes: int = 1 << 20, **overrides) -> list[bytes]:
    """The messages of an honest minibatch of `size` rows of `set_` (x then y;
    x's bytes are zeros, y is 0..size-1), x cut into chunks of chunk_bytes.
    `overrides` replace fields of every x chunk."""
    n, shape, xd, yd = SETS[set_]
    x = bytes(size * int(np.prod(shape)) * 4)
    y = np.arange(size, dtype=np.int64).tobytes()
    out = []
    for off in range(0, len(x), chunk_bytes):
        kw = dict(index=index, name="x", dtype=xd, shape=[size, *shape], offset=off,
                  data=x[off:off + chunk_bytes], total_bytes=len(x))
        kw.update(overrides)
        out.append(chunk(**kw))
    out.append(chunk(index=index, name="y", dtype=yd, shape=[size], data=y, total_bytes=len(y), last=True))
    return out


Script = Callable[[bytes], Iterable[bytes]]


class HostileServer:
    """Serves `script(raw request) -> messages` for GetBatch and StreamBatches,
    and `info` (default dataset_info(); bytes are sent as they are) for
    GetInfo. Use as a context manager; `address` is where it listens."""

    def __init__(self, script: Script | Iterable[bytes], info: pb.DatasetInfo | bytes | None = None):
        self.script: Script = script if callable(script) else (lambda _req, m=list(script): m)
        info = info if info is not None else dataset_info()
        described = info if isinstance(info, bytes) else info.SerializeToString()
        self.sent_bytes = 0
        self.sent_messages = 0
        self.hit_cap = False
        self._lock = threading.Lock()
        served = grpc.method_handlers_generic_handler("minibatch.v1.BatchService", {
            "GetInfo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: described,
                                                           request_deserializer=None,
                                                           response_serializer=None),
            **{name: grpc.unary_stream_rpc_method_handler(self._stream, request_deserializer=None,
                                                          response_serializer=None)
               for name in ("GetBatch", "StreamBatches")}})
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                   options=[("grpc.max_send_message_length", -1)])
        self._server.add_generic_rpc_handlers((served,))
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    def _stream(self, request: bytes, context) -> Iterator[bytes]:
        for m in self.script(request):
            if not context.is_active():
                return
            with self._lock:
                if self.sent_bytes + len(m) > CAP_BYTES or self.sent_messages >= CAP_MESSAGES:
                    self.hit_cap = True
                    return
                self.sent_bytes += len(m)
                self.sent_messages += 1
            yield m

    def __enter__(self) -> "HostileServer":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(None)


def endless(messages: Callable[[int], Iterable[bytes]], start: int = 0) -> Iterator[bytes]:
    """messages(0), messages(1), ... without end (the server's cap ends it)."""
    i = start
    while True:
        yield from messages(i)
        i += 1
