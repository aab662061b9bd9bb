"""The transports that carry GetBatch and StreamBatches, behind one small
interface:

    t.get_batch(request, expected, timeout) -> wire.Batch
    t.stream_batches(request, expected, timeout) -> call
        iterate the call for its wire.Batch minibatches; call.cancel(),
        from any thread, ends it (the iteration then raises CANCELLED)
    t.learn(info) with the server's serialized GetInfo answer, before the
        first minibatch (Client does): what the transport itself bounds by

Both raise MinibatchErrors only (the call's gRPC status through
errors.for_status; a bad stream as ProtocolError or ChecksumError, naming
the server), and both check every minibatch against `expected`
(expect.Expected: what the request asked for), so Client, epochs and
failover above them are one code path.

- GrpcioTransport: grpcio, always installed. Raw messages, reassembled and
  checked by wire.Assembler.
- NativeTransport: the optional `minibatch-client-native` package (tonic in
  Rust, clients/python/native), which reassembles and checks chunks itself
  (crates/tensor-chunks) and hands over whole minibatches. Client picks it by
  default when it is installed (use_native). `learn` hands it the GetInfo
  answer (Channel.learn_info): from then on the Rust side holds every chunk
  to the dataset's exact shapes and every message to the server's
  advertised limit, as wire.Assembler does for grpcio.

Messages: a message over the client's cap (MAX_RECEIVE_MESSAGE_BYTES, or
the Client's grpc.max_receive_message_length) is refused before it is
buffered, RESOURCE_EXHAUSTED on both transports; one under the cap but over
the server's own advertised limit is a ProtocolError on both.

GetInfo and the health check always go over grpcio (grpcio_channel).
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import grpc
import grpc.experimental
import numpy as np

from ._proto import minibatch_pb2 as pb
from .dtypes import dtype_name
from .errors import ChecksumError, MinibatchError, ProtocolError, for_status
from .expect import Expected, over_the_servers_limit
from .wire import Assembler, Batch, Tensor

try:  # the optional native transport
    import minibatch_client_native as native
except ImportError:  # pragma: no cover - depends on what is installed
    native = None

SERVICE = "minibatch.v1.BatchService"
GET_BATCH = f"/{SERVICE}/GetBatch"
STREAM_BATCHES = f"/{SERVICE}/StreamBatches"

#: Largest message grpcio accepts (grpc.max_receive_message_length). Not
#: unlimited: a server decides its message size (--max-message-bytes, 4 MiB by
#: default, advertised in GetInfo and enforced per message by wire.Assembler),
#: but a broken or hostile one could otherwise make grpcio buffer a message of
#: any size before the client sees a byte of it. 64 MiB is 16 times the
#: server's default; for a server configured beyond it, pass
#: options=[("grpc.max_receive_message_length", n)] to Client.
MAX_RECEIVE_MESSAGE_BYTES = 64 << 20

#: grpcio channel options of every Client, before its own `options`.
DEFAULT_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
)


def message_cap(options: Sequence[tuple[str, object]]) -> int:
    """The client's cap on one message, as the (last) grpc.max_receive_message_length
    in `options` says: what the native transport is given too. Negative is
    grpcio's "unlimited": any length a gRPC message can have (32 bits)."""
    cap = dict(options).get("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES)
    cap = int(cap)  # type: ignore[call-overload]
    return (1 << 32) - 1 if cap < 0 else cap

# grpcio's single-threaded mode for server-streaming ("unary-stream") calls:
# the iterator drives the completion queue on the calling thread instead of a
# channel thread handing each message over. Note the option key is the
# string "SingleThreadedUnaryStream"; "grpc.experimental.SingleThreadedUnaryStream"
# is silently ignored. Measured here (README "Performance"): faster for
# GetBatch (short streams: no thread hand-off per call), slower for a long
# StreamBatches (a channel thread receives the next message while this one
# parses). Each server gets two grpc.Channel objects, one per mode; their core
# options are identical, so they share one connection.
SINGLE_THREADED = (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)

# Chunk size the native transport asks for: whole tensors up to the 4 MiB
# default message limit (src/client.rs WHOLE_MESSAGES).
NATIVE_CHUNK_BYTES = (4 << 20) - 4096

# The native transport's RpcError carries the status code as an int.
_STATUS_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}

# The native transport's own refusal of a message over its limit
# (crates/grpc-frames MessageReader), as RESOURCE_EXHAUSTED. The limit it
# names is the one in force: the client's cap, or the server's advertised
# limit once learned (lower). A server sending this text as its own status
# gets, at worst, a ProtocolError.
_NATIVE_OVER_LIMIT = re.compile(r"response message of (\d+) bytes exceeds this client's limit of (\d+) bytes")
_NATIVE_RPC_ERROR = native.RpcError if native is not None else ()
_NATIVE_CHUNK_ERROR = native.ChunkError if native is not None else ()

# host:port, [v6]:port or a bare host: what the native transport dials.
_PLAIN_TARGET = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:\d+)?$")


def _native_status(code: int, details: str, address: str, limits: Optional[tuple[int, Optional[int]]]):
    """The MinibatchError for a native RpcError: its status, except for the
    native side's refusal of a message over its limit, which reads as
    grpcio's would: RESOURCE_EXHAUSTED over the client's cap (grpcio's words),
    a ProtocolError under it but over the server's advertised limit."""
    status = _STATUS_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    m = _NATIVE_OVER_LIMIT.fullmatch(details) if status == grpc.StatusCode.RESOURCE_EXHAUSTED else None
    if m and limits is not None:
        size = int(m.group(1))
        cap, advertised = limits
        if size > cap:
            return for_status(status, f"Received message larger than max ({size} vs. {cap})", address)
        if advertised is not None and size > advertised:
            return over_the_servers_limit(size, advertised, address)
    return for_status(status, details, address)


@contextmanager
def minibatch_errors(address: str, limits: Optional[tuple[int, Optional[int]]] = None):
    """Every failure of a call to `address` (grpcio's, the native
    transport's, or one the client found) as a MinibatchError naming the
    server: the one place where transport exceptions are translated.
    `limits`, for a native call: (the client's message cap, the server's
    advertised limit or None)."""
    try:
        yield
    except MinibatchError as e:  # found by the client: Expected, Assembler
        if e.address is None:
            e.address = address
        raise
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = (e.details() if hasattr(e, "details") else None) or str(e)
        raise for_status(code, details, address) from None
    except _NATIVE_RPC_ERROR as e:
        code, details = e.args
        raise _native_status(code, details, address, limits) from None
    except _NATIVE_CHUNK_ERROR as e:
        kind, message = e.args
        raise (ChecksumError if kind == "checksum" else ProtocolError)(message, address=address) from None


def _serialize(m) -> bytes:
    return m.SerializeToString()


# --- grpcio --------------------------------------------------------------------------

def grpcio_channel(address: str, options: Sequence[tuple[str, object]],
                   credentials: Optional[grpc.ChannelCredentials], single_threaded: bool) -> grpc.Channel:
    """A grpcio channel to `address`, in SingleThreadedUnaryStream mode if asked.

    For a Unix socket (`unix:PATH`, `unix:///PATH`) the :authority is
    "localhost" unless the options name one: grpcio's default there is the
    socket's path, which is no valid HTTP/2 authority, and minibatchd's HTTP/2
    stack resets every call that carries it (PROTOCOL_ERROR)."""
    opts = list(options) + ([SINGLE_THREADED] if single_threaded else [])
    if address.startswith(("unix:", "unix-abstract:")) and not any(
            k == "grpc.default_authority" for k, _ in opts):
        opts.append(("grpc.default_authority", "localhost"))
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=opts)
    return grpc.insecure_channel(address, options=opts)


class GrpcioTransport:
    """GetBatch on one grpcio channel, StreamBatches on another (see
    SINGLE_THREADED); raw message bytes, parsed by wire.parse_chunk without
    a protobuf copy."""

    name = "grpcio"
    #: max_chunk_bytes to ask for: 0, the server's chunk size (1 MiB by
    #: default), near which grpcio measured fastest
    chunk_bytes = 0

    def __init__(self, address: str, get_channel: grpc.Channel, stream_channel: grpc.Channel,
                 metadata: Optional[Sequence[tuple[str, str]]], verify_crc: bool):
        self._address = address
        self._metadata = metadata
        self._verify_crc = verify_crc
        self._get = get_channel.unary_stream(GET_BATCH, request_serializer=_serialize, response_deserializer=None)
        self._stream = stream_channel.unary_stream(STREAM_BATCHES, request_serializer=_serialize,
                                                   response_deserializer=None)

    def learn(self, info: bytes) -> None:
        """Nothing to hand over: wire.Assembler checks against the call's Expected."""

    def close(self) -> None:
        """Nothing to do: the grpcio channels are the Client's to close."""

    def get_batch(self, req: pb.GetBatchRequest, expected: Expected, timeout: Optional[float]) -> Batch:
        batch = None
        for batch in self._call(self._get, req, expected, timeout):
            pass  # `expected` lets one through at most
        if batch is None:
            raise ProtocolError("GetBatch stream ended without a minibatch", address=self._address)
        return batch

    def stream_batches(self, req: pb.StreamBatchesRequest, expected: Expected,
                       timeout: Optional[float]) -> "_GrpcioCall":
        return self._call(self._stream, req, expected, timeout)

    def _call(self, method, req, expected: Expected, timeout: Optional[float]) -> "_GrpcioCall":
        return _GrpcioCall(method(req, timeout=timeout, metadata=self._metadata), expected, self._verify_crc,
                           self._address)


class _GrpcioCall:
    __slots__ = ("_call", "_expected", "_verify_crc", "_address")

    def __init__(self, call, expected: Expected, verify_crc: bool, address: str):
        self._call = call
        self._expected = expected
        self._verify_crc = verify_crc
        self._address = address

    def __iter__(self) -> Iterator[Batch]:
        asm = Assembler(self._expected, self._verify_crc)
        with minibatch_errors(self._address):
            try:
                for msg in self._call:
                    b = asm.push(msg)
                    if b is not None:
                        yield b
                asm.finish()
            finally:
                self._call.cancel()  # no-op when complete; frees the stream on an error or early exit

    def cancel(self) -> None:
        self._call.cancel()


# --- native ----------------------------------------------------------------------------

def native_address(target: str) -> str:
    """The host:port the native transport dials for a grpc target:
    `dns:///host:port` names it with the default resolver."""
    return target[len("dns:///"):] if target.startswith("dns:///") else target


def native_usable(target: str) -> Optional[str]:
    """None when the native transport can serve `target`; else why not."""
    if native is None:
        return "minibatch-client-native is not installed (pip install ./clients/python/native)"
    if not _PLAIN_TARGET.match(native_address(target)):
        return f"the native transport dials host:port or dns:///host:port only, not {target!r}"
    return None


def use_native(asked: Optional[bool], targets: Sequence[str]) -> bool:
    """Whether the native transport carries a Client's minibatches: as
    `asked` (Client's `native`) says, True raising ValueError when it cannot;
    with None, as the environment variable MINIBATCH_CLIENT_TRANSPORT says
    (grpcio or native: operators pick without touching code), else whenever
    it can."""
    why_not = next((w for w in map(native_usable, targets) if w), None)
    if asked and why_not:
        raise ValueError(f"native=True, but {why_not}")
    if asked is None:
        env = os.environ.get("MINIBATCH_CLIENT_TRANSPORT", "").strip().lower()
        if env not in ("", "grpcio", "native"):
            raise ValueError(f"MINIBATCH_CLIENT_TRANSPORT={env!r}: use grpcio or native")
        asked = {"": None, "grpcio": False, "native": True}[env]
        if asked and why_not:
            raise ValueError(f"MINIBATCH_CLIENT_TRANSPORT=native, but {why_not}")
    return why_not is None if asked is None else bool(asked)


def busy_poll_us() -> int:
    """MINIBATCH_CLIENT_BUSY_POLL_US: microseconds of each native GetBatch
    during which the calling thread polls the socket instead of sleeping
    (0 or unset: never; it burns a core while a call is in flight)."""
    env = os.environ.get("MINIBATCH_CLIENT_BUSY_POLL_US", "").strip()
    try:
        us = int(env or 0)
    except ValueError:
        us = -1
    if not 0 <= us <= 10**7:
        raise ValueError(f"MINIBATCH_CLIENT_BUSY_POLL_US={env!r}: microseconds, 0 to 10000000")
    return us


def batch_from_native(t, expected: Expected) -> Batch:
    """A minibatch the native transport reassembled (Call.next_batch,
    Channel.one_batch): (index, [(name, dtype, shape, scale_divisor, writable
    buffer), ...]), checked against `expected` and wrapped without a copy.

    The Rust side has held the minibatch to the same bounds already (the
    GetInfo it learned); these checks stay (a few per minibatch, not per
    chunk) because its bounds are not provably the same in every case: for
    a request the set cannot serve (unknown set, index past the end, more
    ranks than examples) or a GetInfo whose stored dtype is unknown, and
    for StreamBatches' end, it knows less than Expected."""
    index, tensors = t
    expected.begin(index)
    found = {}
    for name, code, shape, scale, buf in tensors:
        npd = expected.tensor(name, code, shape, len(buf))
        found[name] = Tensor(name, dtype_name(code), np.frombuffer(buf, npd).reshape(shape), scale)
    expected.complete()
    return Batch(index, found["x"], found["y"], found.get("indices"))


class _Closed:
    """What a closed NativeTransport calls: grpcio's error for a closed channel."""

    def __getattr__(self, name):
        raise ValueError("Cannot invoke RPC on closed channel!")


_CLOSED = _Closed()


class NativeTransport:
    """GetBatch and StreamBatches on native channels, each on its own
    connection (an epoch's prefetch thread and GetBatch calls do not queue
    behind each other)."""

    name = "native"
    #: max_chunk_bytes to ask for: like the Rust client, the native transport
    #: takes a minibatch's tensor best as one message (the server caps this
    #: at its own limit)
    chunk_bytes = NATIVE_CHUNK_BYTES

    def __init__(self, address: str, metadata: Optional[Sequence[tuple[str, str]]], verify_crc: bool,
                 tls: Optional[dict] = None, max_message_bytes: int = MAX_RECEIVE_MESSAGE_BYTES):
        """max_message_bytes: the client's cap on one message (grpcio's
        grpc.max_receive_message_length, so both transports refuse the same
        messages); the Rust side lowers it to the server's advertised limit
        once it has learned GetInfo."""
        dial = native_address(address)
        self._address = address
        self._metadata = list(metadata) if metadata else None
        self._verify_crc = verify_crc
        self._cap = max_message_bytes
        kw = dict(tls or {}, max_message_bytes=max_message_bytes)
        # Opt-in busy polling during each GetBatch (README "Clients"): the
        # GetBatch channel only; off unless the environment asks for it.
        spin = busy_poll_us()
        try:
            self._get = native.Channel(dial, **kw, **({"busy_poll_us": spin} if spin else {}))
        except TypeError as e:
            raise ValueError("MINIBATCH_CLIENT_BUSY_POLL_US needs a minibatch-client-native that has busy "
                             f"polling (pip install ./clients/python/native): {e}") from None
        self._stream = native.Channel(dial, **kw)

    def learn(self, info: bytes) -> None:
        """Hands the server's serialized GetInfo answer to both channels: the
        Rust side then holds minibatches to the dataset's exact shapes and
        messages to the server's advertised limit."""
        for ch in (self._get, self._stream):
            try:
                ch.learn_info(info)
            except ValueError as e:  # the protobuf parser in Python took it; prost did not
                raise ProtocolError(f"GetInfo answer: {e}", address=self._address) from None

    def _limits(self, expected: Expected) -> tuple[int, Optional[int]]:
        return self._cap, expected.max_message_bytes

    def close(self) -> None:
        """Drops both channels, closing their connections once no call uses
        them (a server can otherwise be left writing into a connection that
        no one reads, until the Client is garbage-collected)."""
        self._get = self._stream = _CLOSED

    def get_batch(self, req: pb.GetBatchRequest, expected: Expected, timeout: Optional[float]) -> Batch:
        """The whole call in one step into Rust."""
        with minibatch_errors(self._address, self._limits(expected)):
            t = self._get.one_batch(GET_BATCH, req.SerializeToString(), self._metadata, timeout, self._verify_crc)
            batch = batch_from_native(t, expected)
            expected.finish()
            return batch

    def stream_batches(self, req: pb.StreamBatchesRequest, expected: Expected,
                       timeout: Optional[float]) -> "_NativeCall":
        raw = req.SerializeToString()
        return _NativeCall(lambda: self._stream.unary_stream(STREAM_BATCHES, raw, self._metadata, timeout),
                           expected, self._verify_crc, self._address, self._limits(expected))


class _NativeCall:
    """Starts when iterated, so that, as with grpcio, every failure (including
    the server refusing the request) surfaces from the iteration."""

    __slots__ = ("_start", "_call", "_cancelled", "_expected", "_verify_crc", "_address", "_limits")

    def __init__(self, start: Callable[[], object], expected: Expected, verify_crc: bool, address: str,
                 limits: tuple[int, Optional[int]]):
        self._limits = limits
        self._start = start
        self._call = None
        self._cancelled = False
        self._expected = expected
        self._verify_crc = verify_crc
        self._address = address

    def __iter__(self) -> Iterator[Batch]:
        with minibatch_errors(self._address, self._limits):
            if self._cancelled:
                raise for_status(grpc.StatusCode.CANCELLED, "call cancelled by the client")
            self._call = call = self._start()
            if self._cancelled:  # cancel() came while the call started
                call.cancel()
            try:
                while (t := call.next_batch(self._verify_crc)) is not None:
                    yield batch_from_native(t, self._expected)
                self._expected.finish()
            finally:
                call.cancel()  # frees the stream on an error or early exit

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()
