"""The native transport (clients/python/native) against a hostile server:
every size it accepts is bounded by the request (the Rust client core's
rules, crates/minibatch-client-core), so a server claiming 2^40 bytes or
streaming without end gets a ProtocolError, not the client's memory.

The server is a real grpcio server on 127.0.0.1 whose GetBatch and
StreamBatches answer with scripted raw messages (endless ones are
generators).

Run: python3 -m pytest tests/python/test_native_limits.py
"""
from __future__ import annotations

import itertools
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest

from paths import ROOT  # noqa: E402  (tests/python/paths.py)
sys.path.insert(0, str(ROOT / "clients" / "python"))

import minibatch_client as mc  # noqa: E402
from minibatch_client._crc32c import crc32c  # noqa: E402
from minibatch_client._proto import minibatch_pb2 as pb  # noqa: E402

native = pytest.importorskip("minibatch_client_native")


def _chunk(**kw) -> bytes:
    data = kw.get("data", b"")
    kw.setdefault("crc32c", crc32c(data))
    return pb.TensorChunk(**kw).SerializeToString()


def _batch(index: int, rows: int) -> list[bytes]:
    x = np.full((rows, 4), index, dtype=np.float32)
    y = np.full(rows, index, dtype=np.int64)
    return [
        _chunk(index=index, name="x", dtype=pb.DTYPE_FLOAT32, shape=[rows, 4], total_bytes=x.nbytes,
               data=x.tobytes()),
        _chunk(index=index, name="y", dtype=pb.DTYPE_INT64, shape=[rows], total_bytes=y.nbytes, data=y.tobytes(),
               last=True),
    ]


class _Server:
    """A grpcio server answering GetBatch / StreamBatches with `script(request)`,
    an iterable of raw messages; counts what it sent."""

    def __init__(self, script):
        self.sent = 0

        def answer(request, context):
            for m in script(request):
                if not context.is_active():
                    return
                self.sent += 1
                yield m

        def handler(req_type):
            return grpc.unary_stream_rpc_method_handler(
                answer, request_deserializer=req_type.FromString, response_serializer=None)

        generic = grpc.method_handlers_generic_handler("minibatch.v1.BatchService", {
            "GetBatch": handler(pb.GetBatchRequest), "StreamBatches": handler(pb.StreamBatchesRequest)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((generic,))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.stop(None)


def _endless(request) -> itertools.chain:
    first = request.index if isinstance(request, pb.GetBatchRequest) else request.start
    return itertools.chain.from_iterable(_batch(i, request.size) for i in itertools.count(first))


def test_total_bytes_beyond_the_request_is_refused():
    def huge(request):
        x = _batch(request.index, request.size)[0]
        c = pb.TensorChunk.FromString(x)
        c.total_bytes = 1 << 40
        while True:  # and its "bytes" forever
            yield c.SerializeToString()
            c.offset += len(c.data)

    with _Server(huge) as s, mc.Client(s.address, native=True, timeout=30) as c:
        with pytest.raises(mc.ProtocolError, match=r"total_bytes 1099511627776 exceeds"):
            c.get_batch("train", 0, 10)


def test_endless_streams_are_cut_after_what_was_asked():
    with _Server(_endless) as s, mc.Client(s.address, native=True, timeout=30) as c:
        with pytest.raises(mc.ProtocolError, match="one more than the 1 the call asked for"):
            c.get_batch("train", 3, 5)
        got = []
        with pytest.raises(mc.ProtocolError, match="minibatch 5 is one more than the 3"):
            for x, y in c.epoch("train", 5, start=2, count=3, prefetch=0):
                got.append(int(x[0, 0]))
        assert got == [2, 3, 4]


def test_shapes_beyond_the_request_are_refused():
    with _Server(lambda r: _batch(r.index, 2 * r.size)) as s, mc.Client(s.address, native=True, timeout=30) as c:
        with pytest.raises(mc.ProtocolError, match="20 rows where at most 10"):
            c.get_batch("train", 0, 10)


def test_channel_bounds_and_learned_info():
    ch = native.Channel("127.0.0.1:1")
    assert ch.max_message_bytes == native.MAX_MESSAGE_BYTES == 64 << 20
    assert native.MAX_EXAMPLE_BYTES == 1 << 20
    info = pb.DatasetInfo(limits=pb.Limits(max_message_bytes=4 << 20))
    ch.learn_info(info.SerializeToString())
    assert ch.max_message_bytes == 4 << 20
    with pytest.raises(ValueError, match="DatasetInfo"):
        ch.learn_info(b"\xff\xff")
    assert native.Channel("127.0.0.1:1", max_message_bytes=1 << 20).max_message_bytes == 1 << 20
    with pytest.raises(ValueError, match="not a method that returns minibatches"):
        ch.one_batch("/minibatch.v1.BatchService/GetInfo", b"")
