"""The Python client against a broken or hostile server (hostile.py: a real
grpcio server on a loopback port that describes a small dataset in GetInfo
and answers GetBatch and StreamBatches with scripted raw messages).

Whatever such a server sends, the client must fail the call with its own
errors (ProtocolError or ChecksumError, MinibatchErrors), never numpy's
MemoryError or a bare ValueError / IndexError, must allocate nothing the
request did not ask for, and must cut a stream that sends more than asked
(issue 17, finding 7).

Every case runs on both transports and asserts the same error class and the
same key phrase on both: grpcio's chunks are checked by wire.Assembler and
expect.Expected as they arrive; the native transport's Rust side
(crates/tensor-chunks, given the server's GetInfo by the client through
Channel.learn_info) checks them first, with the same rules in the same
order and the same words, and the client checks each minibatch it hands
over. The last section tests the native Channel itself (its bounds before
and after learn_info).
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

MIB = 1 << 20

TRANSPORTS = [pytest.param(True, id="native"), pytest.param(False, id="grpcio")]


def _client(server: HostileServer, native: bool, **kw) -> mc.Client:
    if native and transport.native is None:
        pytest.skip("minibatch-client-native is not installed (scripts/test.sh installs it and requires it)")
    c = mc.Client(server.address, native=native, timeout=60, **kw)
    assert c.transport == ("native" if native else "grpcio")
    return c


def _cases(table: dict) -> list:
    """table x [native, grpcio]."""
    return [pytest.param(case, native, id=f"{name}-{'native' if native else 'grpcio'}")
            for name, case in table.items() for native in (True, False)]


# --- malformed or unasked-for minibatches: GetBatch("train", 0, 2) and an epoch of it -----

X = np.arange(8, dtype=np.float32).reshape(2, 4)
Y = np.array([1, 2], dtype=np.int64)
XC = dict(index=0, name="x", dtype=pb.DTYPE_FLOAT32, shape=[2, 4], total_bytes=32, data=X.tobytes())
YC = dict(index=0, name="y", dtype=pb.DTYPE_INT64, shape=[2], total_bytes=16, data=Y.tobytes(), last=True)


def _x(**kw) -> bytes:
    return chunk(**{**XC, **kw})


def _y(**kw) -> bytes:
    return chunk(**{**YC, **kw})


LONG_NAME = "z" * 100_000

#: name -> (messages, error class, key phrase both transports' messages contain (a regex))
BAD = {
    # what an honest server sends, for contrast
    "good": ([_x(), _y()], None, None),
    # corrupt or malformed chunks
    "crc": ([_x(crc32c=1), _y()], mc.ChecksumError,
            r"^minibatch 0, tensor x: chunk at offset 0 failed its CRC-32C check"),
    "not-a-chunk": ([b"\xff\xff"], mc.ProtocolError, "response message is not a valid TensorChunk: "),
    "empty-stream": ([], mc.ProtocolError, "the stream ended after 0 "),
    "ends-mid-minibatch": ([_x()], mc.ProtocolError, "the stream ended in the middle of minibatch 0"),
    # tensors missing, out of order, twice, or not asked for
    "no-x": ([_y()], mc.ProtocolError, r'minibatch 0 lacks x or y \(tensor "x" missing\)'),
    "y-before-x": ([_y(last=False), _x(last=True)], mc.ProtocolError,
                   r'minibatch 0 lacks x or y \(tensor "x" missing\)'),
    "no-y": ([_x(last=True)], mc.ProtocolError, r'minibatch 0 lacks x or y \(tensor "y" missing\)'),
    "x-twice": ([_x(), _y(last=False), _x()], mc.ProtocolError,
                "minibatch 0: tensor \"x\" arrived where the minibatch's end .* was due"),
    "tensor-not-asked-for": ([_x(), chunk(index=0, name="z", dtype=pb.DTYPE_UINT8, shape=[2], total_bytes=2,
                                          data=b"zz"), _y()], mc.ProtocolError,
                             'minibatch 0: tensor "z" arrived where "y" was due'),
    "indices-not-asked-for": ([_x(), _y(last=False), chunk(index=0, name="indices", dtype=pb.DTYPE_INT64, shape=[2],
                                                           total_bytes=16, data=bytes(16), last=True)],
                              mc.ProtocolError, "minibatch 0: tensor \"indices\" arrived where the minibatch's end"),
    # a name from the wire is echoed shortened
    "long-name": ([chunk(index=0, name=LONG_NAME, dtype=pb.DTYPE_UINT8, shape=[2], total_bytes=2, data=b"zz")],
                  mc.ProtocolError, r'^minibatch 0: tensor "z{32}\u2026" arrived where "x" was due'),
    # sizes the request does not allow (checked before anything is allocated)
    "total_bytes-2**40": ([_x(total_bytes=1 << 40), _y()], mc.ProtocolError,
                          r"^minibatch 0, tensor x: total_bytes 1099511627776 exceeds the 32 bytes asked for"),
    "total_bytes-2**40-consistent-shape": ([_x(shape=[2, 1 << 37], total_bytes=1 << 40), _y()], mc.ProtocolError,
                                           "total_bytes 1099511627776 exceeds the 32 bytes asked for"),
    "total_bytes-2**64-1": ([_x(total_bytes=(1 << 64) - 1), _y()], mc.ProtocolError,
                            "total_bytes 18446744073709551615 exceeds the 32 bytes asked for"),
    "more-rows-than-asked": ([_x(shape=[3, 4], total_bytes=48, data=bytes(48)), _y()], mc.ProtocolError,
                             "tensor x: total_bytes 48 exceeds the 32 bytes asked for"),
    "fewer-rows-than-asked": ([_x(shape=[1, 4], total_bytes=16, data=bytes(16)), _y()], mc.ProtocolError,
                              "tensor x: 1 rows where exactly 2 were asked for"),
    "other-example-shape": ([_x(shape=[2, 5], total_bytes=40, data=bytes(40)), _y()], mc.ProtocolError,
                            "tensor x: total_bytes 40 exceeds the 32 bytes asked for"),
    "other-example-shape-same-bytes": ([_x(shape=[2, 2, 2]), _y()], mc.ProtocolError,
                                       r"tensor x: shape \[2, 2, 2\] where \[2, 4\] was expected"),
    "no-shape": ([_x(shape=[], total_bytes=0, data=b""), _y()], mc.ProtocolError,
                 r"tensor x: shape \[\] where \[rows, \.\.\.\] was expected"),
    "y-shape": ([_x(), _y(shape=[2, 1])], mc.ProtocolError, r"tensor y: shape \[2, 1\] where \[2\] was expected"),
    "total_bytes-short-of-shape": ([_x(total_bytes=16, data=X.tobytes()[:16]), _y()], mc.ProtocolError,
                                   r"tensor x: shape \[2, 4\] of dtype 1 does not make total_bytes 16"),
    "x-dtype": ([_x(dtype=pb.DTYPE_FLOAT64, total_bytes=64, data=bytes(64)), _y()], mc.ProtocolError,
                "tensor x: dtype 2 where dtype 1 was asked for"),
    "unknown-dtype": ([_x(dtype=99), _y()], mc.ProtocolError, "tensor x: dtype 99 where a known dtype was asked for"),
    # minibatches not asked for
    "other-minibatch": ([_x(index=1), _y(index=1)], mc.ProtocolError,
                        "^minibatch 1 arrived where minibatch 0 was due"),
    "two-minibatches": ([_x(), _y(), _x(index=1), _y(index=1)], mc.ProtocolError,
                        "^minibatch 1 is one more than the 1 the call asked for"),
    "interleaved": ([_x(data=X.tobytes()[:16]), _x(index=1)], mc.ProtocolError,
                    "minibatch 1 began before minibatch 0 ended"),
    # offsets and lengths
    "first-offset-2**63": ([_x(offset=1 << 63), _y()], mc.ProtocolError,
                           "tensor x: starts at offset 9223372036854775808"),
    "first-offset-4": ([_x(offset=4)], mc.ProtocolError, "tensor x: starts at offset 4"),
    "offset-past-total": ([_x(data=X.tobytes()[:16]), _x(offset=40, data=X.tobytes()[16:]), _y()],
                          mc.ProtocolError, r"tensor x: chunk at offset 40 out of order \(expected offset 16\)"),
    "offset-overlaps": ([_x(data=X.tobytes()[:16]), _x(offset=8, data=X.tobytes()[8:]), _y()],
                        mc.ProtocolError, r"tensor x: chunk at offset 8 out of order \(expected offset 16\)"),
    "data-past-total": ([_x(data=X.tobytes()[:16]), _x(offset=16, data=bytes(32)), _y()], mc.ProtocolError,
                        "tensor x: chunk at offset 16 of 32 bytes runs past total_bytes 32"),
    "total-changes": ([_x(data=X.tobytes()[:16]), _x(offset=16, data=X.tobytes()[16:], total_bytes=64), _y()],
                      mc.ProtocolError, r"tensor x: total_bytes changed between chunks \(at offset 16\)"),
    "shape-changes": ([_x(data=X.tobytes()[:16]), _x(offset=16, data=X.tobytes()[16:], shape=[2, 2, 2]), _y()],
                      mc.ProtocolError, r"tensor x: shape changed between chunks \(at offset 16\)"),
    "empty-chunk": ([_x(data=X.tobytes()[:16]), _x(offset=16, data=b""), _y()], mc.ProtocolError,
                    "tensor x: empty chunk at offset 16"),
    "tensor-ends-short": ([_x(data=X.tobytes()[:16]), _y()], mc.ProtocolError,
                          "minibatch 0, tensor x ended at 16 of 32 bytes"),
    "last-ends-short": ([_x(), _y(data=Y.tobytes()[:8])], mc.ProtocolError,
                        "minibatch 0, tensor y ended at 8 of 16 bytes"),
}


@pytest.mark.parametrize("case,native", _cases(BAD))
def test_bad_streams_raise_the_clients_errors(case, native):
    """Each scripted answer fails GetBatch and an epoch with the client's own
    error, the same class and key phrase on both transports (the good one
    returns the data, writable)."""
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
        assert type(e.value) is err and e.value.code is None, repr(e.value)
        assert e.value.address == server.address
        assert len(str(e.value)) < 300, "an error message echoes what the server sent, unshortened"
        with pytest.raises(err, match=match) as e:
            list(c.epoch("train", 2, prefetch=0))
        assert type(e.value) is err
        with pytest.raises(err, match=match) as e:  # from the prefetch thread, too
            list(c.epoch("train", 2, prefetch=2))
        assert type(e.value) is err


@pytest.mark.parametrize("native", TRANSPORTS)
def test_indices_asked_for_must_come(native):
    with HostileServer([_x(), _y()]) as server, _client(server, native) as c:
        with pytest.raises(mc.ProtocolError, match=r'minibatch 0 lacks the indices asked for \(tensor "indices"'):
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


@pytest.mark.parametrize("native", TRANSPORTS)
def test_a_minibatch_for_a_request_that_has_none(native):
    """GetBatch past the end of the set (an honest server answers
    OUT_OF_RANGE) answered with an empty minibatch: the native side's bounds
    allow its 0 rows, the client's own check of what the request implies
    (transport.batch_from_native) does not."""
    empty = [_x(index=5, shape=[0, 4], total_bytes=0, data=b""), _y(index=5, shape=[0], total_bytes=0, data=b"")]
    with HostileServer(empty) as server, _client(server, native) as c:
        with pytest.raises(mc.ProtocolError, match="minibatch 5 was sent for a request that has no minibatches"):
            c.get_batch("train", 5, 2)


@pytest.mark.parametrize("native", TRANSPORTS)
def test_a_getinfo_answer_that_is_not_one(native):
    """GetInfo's answer is read before any minibatch: bytes that are not a
    DatasetInfo fail the call with ProtocolError, naming the server."""
    with HostileServer([_x(), _y()], info=b"\xff\xff") as server, _client(server, native) as c:
        with pytest.raises(mc.ProtocolError, match="GetInfo answer is not a valid DatasetInfo") as e:
            c.get_batch("train", 0, 2)
        assert e.value.address == server.address


@pytest.mark.parametrize("native", TRANSPORTS)
def test_the_client_hands_getinfo_to_the_native_transport(native):
    """After GetInfo, the native channels hold messages to the server's
    advertised limit (Channel.learn_info), not their 64 MiB default."""
    with HostileServer([_x(), _y()]) as server, _client(server, native) as c:
        c.get_batch("train", 0, 2)
        t = c._replicas[0].transport
        if native:
            assert [ch.max_message_bytes for ch in (t._get, t._stream)] == [hostile.MAX_MESSAGE_BYTES] * 2
        else:
            assert isinstance(t, transport.GrpcioTransport)


# --- endless streams: cut after what was asked for -------------------------------------

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


#: name -> (script, key phrase); {n} is the number of minibatches asked for
ENDLESS = {
    "total_bytes-2**40-then-data": (_huge_then_data,
                                    f"tensor x: total_bytes 1099511627776 exceeds the {ASKED} bytes asked for"),
    "minibatches": (None, "minibatch {n} is one more than the {n} the call asked for"),  # scripted per call kind
    "empty-chunks": (_empty_chunks, "tensor x: empty chunk at offset 0"),
}


@pytest.mark.parametrize("case,native", _cases(ENDLESS))
@pytest.mark.parametrize("call", ["get_batch", "epoch"])
def test_endless_streams_are_cut(case, native, call):
    """An endless stream fails the call with ProtocolError after at most the
    bytes asked for (plus what was in flight), long before the server's
    safety cap: the client's memory stays bounded by the request."""
    script, match = case
    kind = pb.GetBatchRequest if call == "get_batch" else pb.StreamBatchesRequest
    script = script if script is not None else (lambda req: _minibatches(req, kind))
    minibatches = 1 if call == "get_batch" else 3
    with HostileServer(script) as server, _client(server, native) as c:
        with pytest.raises(mc.ProtocolError, match=match.format(n=minibatches)):
            if call == "get_batch":
                c.get_batch("big", 0, 4)
            else:
                for _ in c.epoch("big", 4, count=minibatches, prefetch=0):
                    pass
        c.close()
    assert not server.hit_cap, f"the client did not cut the stream: {server.sent_bytes} bytes sent"
    assert server.sent_bytes <= minibatches * (ASKED + MIB) + IN_FLIGHT_BYTES, server.sent_bytes


def _filled(index: int, rows: int) -> list[bytes]:
    """An honest minibatch of "many" whose x and y hold its index."""
    x = np.full((rows, 4), index, dtype=np.float32)
    y = np.full(rows, index, dtype=np.int64)
    return [chunk(index=index, name="x", dtype=pb.DTYPE_FLOAT32, shape=[rows, 4], total_bytes=x.nbytes,
                  data=x.tobytes()),
            chunk(index=index, name="y", dtype=pb.DTYPE_INT64, shape=[rows], total_bytes=y.nbytes, data=y.tobytes(),
                  last=True)]


def _endless_filled(kind):
    """A script: honest minibatches of "many" from the one a `kind` request
    asked for first, without end."""
    def script(req: bytes):
        r = kind.FromString(req)
        return endless(lambda i: _filled(i, r.size), start=r.index if kind is pb.GetBatchRequest else r.start)
    return script


@pytest.mark.parametrize("native", TRANSPORTS)
def test_endless_streams_are_cut_after_what_was_asked(native):
    """GetBatch keeps its one minibatch and StreamBatches its `count`; the
    first one more cuts the call, and the ones asked for came through."""
    with HostileServer(_endless_filled(pb.GetBatchRequest)) as server, _client(server, native) as c:
        with pytest.raises(mc.ProtocolError, match="minibatch 4 is one more than the 1 the call asked for"):
            c.get_batch("many", 3, 5)
    assert not server.hit_cap
    with HostileServer(_endless_filled(pb.StreamBatchesRequest)) as server, _client(server, native) as c:
        got = []
        with pytest.raises(mc.ProtocolError, match="minibatch 5 is one more than the 3 the call asked for"):
            for x, y in c.epoch("many", 5, start=2, count=3, prefetch=0):
                got.append((int(x[0, 0]), int(y[0])))
        assert got == [(2, 2), (3, 3), (4, 4)]
    assert not server.hit_cap


@pytest.mark.parametrize("native", TRANSPORTS)
def test_total_bytes_beyond_the_request_is_refused(native):
    """x declared 2**40 bytes and its "bytes" sent forever, for a GetBatch
    whose size (10) is more than the set holds (2): bounded by the 2 rows
    the set has, the first chunk fails the call."""
    def huge(req: bytes):
        return endless(lambda i: [_x(offset=i * 32, data=bytes(32), total_bytes=1 << 40)])

    with HostileServer(huge) as server, _client(server, native) as c:
        with pytest.raises(mc.ProtocolError, match=r"total_bytes 1099511627776 exceeds the 32 bytes asked for"):
            c.get_batch("train", 0, 10)
    assert not server.hit_cap


@pytest.mark.parametrize("native", TRANSPORTS)
def test_shapes_beyond_the_request_are_refused(native):
    """Twice the rows asked for, shape and total_bytes consistent: refused by
    the request's bound before anything is kept."""
    with HostileServer(lambda req: _filled(0, 20)) as server, _client(server, native) as c:
        with pytest.raises(mc.ProtocolError, match="tensor x: total_bytes 320 exceeds the 160 bytes asked for"):
            c.get_batch("many", 0, 10)


# --- message sizes ---------------------------------------------------------------------

@pytest.mark.parametrize("native", TRANSPORTS)
def test_messages_over_the_servers_advertised_limit(native):
    """An otherwise valid minibatch in one 5 MiB message, from a server whose
    GetInfo says it sends 4 MiB at most, is a ProtocolError (grpcio's
    checked by wire.Assembler; the native side refuses it before buffering
    it, having learned the limit from GetInfo)."""
    size = 20  # 20 x 256 KiB = 5 MiB of x
    with HostileServer(minibatch("big", 0, size, chunk_bytes=size * ASKED)) as server, _client(server, native) as c:
        with pytest.raises(mc.ProtocolError, match=r"^a message of \d+ bytes, over the server's own limit of 4194304 "):
            c.get_batch("big", 0, size)


@pytest.mark.parametrize("native", TRANSPORTS)
def test_messages_over_the_clients_cap(native):
    """No message over MAX_RECEIVE_MESSAGE_BYTES (64 MiB) is received, not
    unlimited: an otherwise valid minibatch in one 65 MiB message fails the
    call as RESOURCE_EXHAUSTED, before it is buffered whole, on both
    transports (over the client's own cap, whatever the server advertised)."""
    assert dict(mc.DEFAULT_OPTIONS)["grpc.max_receive_message_length"] == mc.MAX_RECEIVE_MESSAGE_BYTES == 64 * MIB
    size = 260  # 260 x 256 KiB = 65 MiB of x
    with HostileServer(minibatch("big", 0, size, chunk_bytes=size * ASKED)) as server, _client(server, native) as c:
        with pytest.raises(mc.MinibatchError, match=rf"larger than max \(\d+ vs\. {64 * MIB}\)") as e:
            c.get_batch("big", 0, size)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
        assert type(e.value) is mc.ResourceExhausted  # its own class since attach (--max-attached)


@pytest.mark.parametrize("native", TRANSPORTS)
def test_the_message_cap_is_the_callers_to_raise(native):
    """Client(options=) overrides DEFAULT_OPTIONS (grpcio itself would keep
    the first value given), on both transports: with the cap raised, the
    65 MiB message gets through and fails on the server's advertised limit
    instead."""
    size = 260
    with HostileServer(minibatch("big", 0, size, chunk_bytes=size * ASKED)) as server:
        with _client(server, native, options=[("grpc.max_receive_message_length", 128 * MIB)]) as c:
            with pytest.raises(mc.ProtocolError, match="over the server's own limit of 4194304"):
                c.get_batch("big", 0, size)


# --- the native Channel itself -------------------------------------------------------

def _native():
    if transport.native is None:
        pytest.skip("minibatch-client-native is not installed (scripts/test.sh installs it and requires it)")
    return transport.native


def test_channel_bounds_and_learned_info():
    native = _native()
    ch = native.Channel("127.0.0.1:1")
    assert ch.max_message_bytes == native.MAX_MESSAGE_BYTES == 64 << 20
    assert native.MAX_EXAMPLE_BYTES == 1 << 20
    info = pb.DatasetInfo(limits=pb.Limits(max_message_bytes=4 << 20))
    ch.learn_info(info.SerializeToString())
    assert ch.max_message_bytes == 4 << 20
    with pytest.raises(ValueError, match="DatasetInfo"):
        ch.learn_info(b"\xff\xff")
    assert native.Channel("127.0.0.1:1", max_message_bytes=1 << 20).max_message_bytes == 1 << 20
    # a limit the server advertises never raises the client's own
    small = native.Channel("127.0.0.1:1", max_message_bytes=1 << 20)
    small.learn_info(info.SerializeToString())
    assert small.max_message_bytes == 1 << 20
    with pytest.raises(ValueError, match="not a method that returns minibatches"):
        ch.one_batch("/minibatch.v1.BatchService/GetInfo", b"")


def test_channel_bounds_rows_by_the_request_alone_and_shapes_once_learned():
    """Without GetInfo the Channel holds a minibatch to the request's rows
    (at most `size`) and max_example_bytes per example; with it, to the
    dataset's exact shapes."""
    native = _native()
    req = pb.GetBatchRequest(set="many", index=0, size=10).SerializeToString()
    with HostileServer(lambda r: _filled(0, 20)) as server:
        ch = native.Channel(server.address)
        with pytest.raises(native.ChunkError) as e:
            ch.one_batch(native.GET_BATCH, req, None, 30)
        assert e.value.args[0] == "protocol"
        assert "minibatch 0, tensor x: 20 rows where at most 10 were asked for" in e.value.args[1]
        ch.learn_info(hostile.dataset_info().SerializeToString())
        with pytest.raises(native.ChunkError) as e:
            ch.one_batch(native.GET_BATCH, req, None, 30)
        assert e.value.args == ("protocol", "minibatch 0, tensor x: total_bytes 320 exceeds the 160 bytes asked for "
                                            "(10 rows of at most 16 bytes)")
    # an example over max_example_bytes, while shapes are unknown
    with HostileServer(lambda r: _filled(0, 10)) as server:
        ch = native.Channel(server.address, max_example_bytes=8)
        with pytest.raises(native.ChunkError, match="total_bytes 160 exceeds the 80 bytes asked for"):
            ch.one_batch(native.GET_BATCH, req, None, 30)
        index, tensors = native.Channel(server.address).one_batch(native.GET_BATCH, req, None, 30)
        assert index == 0 and [t[0] for t in tensors] == ["x", "y"]
