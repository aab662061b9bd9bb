"""The Python client against a broken or hostile server (hostile.py: a real
grpcio server on a loopback port that describes a small dataset in GetInfo
and answers GetBatch and StreamBatches with scripted raw messages).

Whatever such a server sends, the client must fail the call with its own
errors (ProtocolError or ChecksumError, MinibatchErrors), never numpy's
MemoryError or a bare ValueError / IndexError, must allocate nothing the
request did not ask for, and must cut a stream that sends more than asked
(issue 17, finding 7). Every case runs on both transports: grpcio's chunks
are checked by wire.Assembler as they arrive; the native transport
reassembles in Rust and the client checks each minibatch it hands over.

Where the native transport cannot yet pass because of its Rust side (it does
not bound a tensor by the request, nor messages by the server's advertised
limit), the case is marked xfail(strict=True) with that reason: it fails
loudly once the Rust side is fixed, so that the mark goes.
"""
from __future__ import annotations

import sys

import grpc
import numpy as np
import pytest

from paths import ROOT  # tests/python/paths.py

sys.path.insert(0, str(ROOT / "clients" / "python"))

import minibatch_client as mc  # noqa: E402
from minibatch_client import transport  # noqa: E402
from minibatch_client._proto import minibatch_pb2 as pb  # noqa: E402

import hostile  # noqa: E402  (tests/python/hostile.py)
from hostile import HostileServer, chunk, endless, minibatch  # noqa: E402

#: What a server can have sent before it learns that the client cancelled:
#: the HTTP/2 flow-control windows (the native transport's are 8 MiB per
#: stream and 16 MiB per connection; grpcio's grow from 64 KiB) and the
#: loopback socket buffers. Far below hostile.CAP_BYTES, where an endless
#: stream that no one cuts ends.
IN_FLIGHT_BYTES = 48 << 20

RUST_SIDE = ("native transport, Rust side: a tensor is not bounded by the request nor a message by the "
             "server's advertised limit (clients/python/native, crates/tensor-chunks; issue 17 finding 7)")


TRANSPORTS = [pytest.param(True, id="native"), pytest.param(False, id="grpcio")]
#: the same, for a case the native transport fails because of its Rust side
TRANSPORTS_NATIVE_XFAIL = [pytest.param(True, id="native", marks=pytest.mark.xfail(strict=True, reason=RUST_SIDE)),
                           pytest.param(False, id="grpcio")]


def _client(server: HostileServer, native: bool) -> mc.Client:
    if native and transport.native is None:
        pytest.skip("minibatch-client-native is not installed (scripts/test.sh installs it and requires it)")
    c = mc.Client(server.address, native=native, timeout=60)
    assert c.transport == ("native" if native else "grpcio")
    return c


def _cases(table: dict, rust_side: tuple[str, ...] = ()) -> list:
    """table x [native, grpcio], the native runs of `rust_side` cases marked xfail(strict)."""
    out = []
    for name, case in table.items():
        for native in (True, False):
            marks = [pytest.mark.xfail(strict=True, reason=RUST_SIDE)] if native and name in rust_side else []
            out.append(pytest.param(case, native, id=f"{name}-{'native' if native else 'grpcio'}", marks=marks))
    return out


# --- malformed or unasked-for minibatches: GetBatch("train", 0, 2) and an epoch of it -----

X = np.arange(8, dtype=np.float32).reshape(2, 4)
Y = np.array([1, 2], dtype=np.int64)
XC = dict(index=0, name="x", dtype=pb.DTYPE_FLOAT32, shape=[2, 4], total_bytes=32, data=X.tobytes())
YC = dict(index=0, name="y", dtype=pb.DTYPE_INT64, shape=[2], total_bytes=16, data=Y.tobytes(), last=True)


def _x(**kw) -> bytes:
    return chunk(**{**XC, **kw})


def _y(**kw) -> bytes:
    return chunk(**{**YC, **kw})


BAD = {
    # what an honest server sends, for contrast
    "good": ([_x(), _y()], None, None),
    # corrupt or malformed chunks
    "crc": ([_x(crc32c=1), _y()], mc.ChecksumError, "CRC-32C"),
    "no-x": ([_y()], mc.ProtocolError, "lacks x or y"),
    "ends-mid-minibatch": ([_x()], mc.ProtocolError, "in the middle of minibatch 0"),
    "not-a-chunk": ([b"\xff\xff"], mc.ProtocolError, "TensorChunk"),
    # sizes the request does not allow (checked before anything is allocated)
    "total_bytes-2**40": ([_x(total_bytes=1 << 40), _y()], mc.ProtocolError, None),
    "total_bytes-2**40-consistent-shape": ([_x(shape=[2, 1 << 37], total_bytes=1 << 40), _y()], mc.ProtocolError,
                                           None),
    "total_bytes-2**64-1": ([_x(total_bytes=(1 << 64) - 1), _y()], mc.ProtocolError, None),
    "more-rows-than-asked": ([_x(shape=[3, 4], total_bytes=48, data=bytes(48)), _y()], mc.ProtocolError, "shape"),
    "other-example-shape": ([_x(shape=[2, 5], total_bytes=40, data=bytes(40)), _y()], mc.ProtocolError, "shape"),
    "y-shape": ([_x(), _y(shape=[2, 1])], mc.ProtocolError, "shape"),
    "x-dtype": ([_x(dtype=pb.DTYPE_FLOAT64, total_bytes=64, data=bytes(64)), _y()], mc.ProtocolError, "dtype"),
    "unknown-dtype": ([_x(dtype=99), _y()], mc.ProtocolError, "dtype"),
    "tensor-not-asked-for": ([_x(), chunk(index=0, name="z", dtype=pb.DTYPE_UINT8, shape=[2], total_bytes=2,
                                          data=b"zz"), _y()], mc.ProtocolError, "not asked for"),
    "indices-not-asked-for": ([_x(), _y(last=False), chunk(index=0, name="indices", dtype=pb.DTYPE_INT64, shape=[2],
                                                           total_bytes=16, data=bytes(16), last=True)],
                              mc.ProtocolError, "not asked for"),
    "other-minibatch": ([_x(index=1), _y(index=1)], mc.ProtocolError, "minibatch"),
    "two-minibatches": ([_x(), _y(), _x(index=1), _y(index=1)], mc.ProtocolError, "minibatch"),
    # offsets out of range
    "first-offset-2**63": ([_x(offset=1 << 63), _y()], mc.ProtocolError, "starts at offset"),
    "first-offset-4": ([_x(offset=4)], mc.ProtocolError, "starts at offset"),
    "offset-past-total": ([_x(data=X.tobytes()[:16]), _x(offset=40, data=X.tobytes()[16:]), _y()],
                          mc.ProtocolError, None),
    "offset-overlaps": ([_x(data=X.tobytes()[:16]), _x(offset=8, data=X.tobytes()[8:]), _y()],
                        mc.ProtocolError, None),
    "data-past-total": ([_x(data=X.tobytes()[:16]), _x(offset=16, data=bytes(32)), _y()], mc.ProtocolError, None),
    "total-changes": ([_x(data=X.tobytes()[:16]), _x(offset=16, data=X.tobytes()[16:], total_bytes=64), _y()],
                      mc.ProtocolError, None),
}


@pytest.mark.parametrize("case,native", _cases(BAD))
def test_bad_streams_raise_the_clients_errors(case, native):
    """Each scripted answer fails GetBatch and an epoch with the client's own
    error on both transports (the good one returns the data, writable)."""
    messages, err, match = case
    with HostileServer(messages) as server, _client(server, native) as c:
        if err is None:
            bx, by = c.get_batch("train", 0, 2)
            assert np.array_equal(bx, X) and np.array_equal(by, Y)
            bx += 1  # writable, as documented
            [(ex, ey)] = list(c.epoch("train", 2, prefetch=0))
            assert np.array_equal(ex, X) and np.array_equal(ey, Y)
            ex += 1
            return
        with pytest.raises(err, match=match) as e:
            c.get_batch("train", 0, 2)
        assert e.value.address == server.address
        with pytest.raises(err, match=match):
            list(c.epoch("train", 2, prefetch=0))
        with pytest.raises(err, match=match):  # from the prefetch thread, too
            list(c.epoch("train", 2, prefetch=2))


@pytest.mark.parametrize("native", TRANSPORTS)
def test_indices_asked_for_must_come(native):
    with HostileServer([_x(), _y()]) as server, _client(server, native) as c:
        with pytest.raises(mc.ProtocolError, match="without the indices"):
            c.get_batch("train", 0, 2, with_indices=True)


@pytest.mark.parametrize("native", TRANSPORTS)
def test_a_stream_that_ends_early_is_an_error(native):
    """StreamBatches that ends without an error status before every minibatch
    asked for came would lose minibatches silently: a ProtocolError."""
    with HostileServer(minibatch("big", 0, 4) + minibatch("big", 1, 4)) as server, _client(server, native) as c:
        with pytest.raises(mc.ProtocolError, match="after 2 of the 3 minibatches"):
            list(c.epoch("big", 4, count=3, prefetch=0))


@pytest.mark.parametrize("native", TRANSPORTS)
def test_what_getinfo_declares_is_checked_too(native):
    """A server whose GetInfo and chunks agree on a tensor this machine cannot
    hold (2**41 bytes for 2 examples) fails the call with ProtocolError, not
    numpy's MemoryError."""
    info = hostile.dataset_info()
    info.sets[0].x.shape[:] = [1 << 38]
    messages = [_x(shape=[2, 1 << 38], total_bytes=1 << 41), _y()]
    with HostileServer(messages, info=info) as server, _client(server, native) as c:
        with pytest.raises(mc.ProtocolError):
            c.get_batch("train", 0, 2)


# --- endless streams: cut after what was asked for -------------------------------------

MIB = 1 << 20
ASKED = 4 * (1 << 16) * 4  # x of GetBatch("big", index, 4): 1 MiB (y: 32 bytes)


def _huge_then_data(req: bytes):
    """x of minibatch 0 declared 2**40 bytes, then 1 MiB chunks of it without end."""
    return endless(lambda i: [chunk(index=0, name="x", dtype=pb.DTYPE_FLOAT32, shape=[4, 1 << 16],
                                    offset=i * MIB, data=bytes(MIB), total_bytes=1 << 40)])


def _minibatches(req: bytes, kind):
    """Honest minibatches from the one asked for first, without end."""
    r = kind.FromString(req)
    return endless(lambda i: minibatch("big", i, 4), start=r.index if kind is pb.GetBatchRequest else r.start)


def _empty_chunks(req: bytes):
    """Empty chunks of x of minibatch 0 (its header honest), without end."""
    return endless(lambda i: [chunk(index=0, name="x", dtype=pb.DTYPE_FLOAT32, shape=[4, 1 << 16],
                                    total_bytes=ASKED)])


ENDLESS = {
    "total_bytes-2**40-then-data": _huge_then_data,
    "minibatches": None,  # scripted per call kind below
    "empty-chunks": _empty_chunks,
}


@pytest.mark.parametrize("case,native", _cases(ENDLESS, rust_side=("total_bytes-2**40-then-data", "empty-chunks")))
@pytest.mark.parametrize("call", ["get_batch", "epoch"])
def test_endless_streams_are_cut(case, native, call):
    """An endless stream fails the call with ProtocolError after at most the
    bytes asked for (plus what was in flight), long before the server's
    safety cap: the client's memory stays bounded by the request."""
    kind = pb.GetBatchRequest if call == "get_batch" else pb.StreamBatchesRequest
    script = case if case is not None else (lambda req: _minibatches(req, kind))
    minibatches = 1 if call == "get_batch" else 3
    with HostileServer(script) as server, _client(server, native) as c:
        with pytest.raises(mc.ProtocolError):
            if call == "get_batch":
                c.get_batch("big", 0, 4)
            else:
                for _ in c.epoch("big", 4, count=minibatches, prefetch=0):
                    pass
        c.close()
    assert not server.hit_cap, f"the client did not cut the stream: {server.sent_bytes} bytes sent"
    assert server.sent_bytes <= minibatches * (ASKED + MIB) + IN_FLIGHT_BYTES, server.sent_bytes


# --- message sizes ---------------------------------------------------------------------

@pytest.mark.parametrize("native", TRANSPORTS_NATIVE_XFAIL)
def test_messages_over_the_servers_advertised_limit(native):
    """An otherwise valid minibatch in one 5 MiB message, from a server whose
    GetInfo says it sends 4 MiB at most, is a ProtocolError."""
    size = 20  # 20 x 256 KiB = 5 MiB of x
    with HostileServer(minibatch("big", 0, size, chunk_bytes=size * ASKED)) as server, _client(server, native) as c:
        with pytest.raises(mc.ProtocolError, match="limit"):
            c.get_batch("big", 0, size)


@pytest.mark.parametrize("native", TRANSPORTS_NATIVE_XFAIL)
def test_messages_over_the_clients_cap(native):
    """No message over MAX_RECEIVE_MESSAGE_BYTES (64 MiB) is received, not
    unlimited: an otherwise valid minibatch in one 65 MiB message fails the
    call (on grpcio as RESOURCE_EXHAUSTED, before it is buffered whole)."""
    assert dict(mc.DEFAULT_OPTIONS)["grpc.max_receive_message_length"] == mc.MAX_RECEIVE_MESSAGE_BYTES == 64 * MIB
    size = 260  # 260 x 256 KiB = 65 MiB of x
    with HostileServer(minibatch("big", 0, size, chunk_bytes=size * ASKED)) as server, _client(server, native) as c:
        with pytest.raises(mc.MinibatchError) as e:
            c.get_batch("big", 0, size)
        if not native:
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value


def test_the_message_cap_is_the_callers_to_raise():
    """Client(options=) overrides DEFAULT_OPTIONS (grpcio itself would keep
    the first value given): with the cap raised, the 65 MiB message gets
    through grpcio and fails on the server's advertised limit instead."""
    size = 260
    with HostileServer(minibatch("big", 0, size, chunk_bytes=size * ASKED)) as server:
        with mc.Client(server.address, native=False, options=[("grpc.max_receive_message_length", 128 * MIB)]) as c:
            with pytest.raises(mc.ProtocolError, match="limit"):
                c.get_batch("big", 0, size)
