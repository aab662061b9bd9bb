"""Client for minibatchd's BatchService (proto/minibatch/v1/minibatch.proto)."""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, TypeVar, Union

import grpc
import grpc.experimental

from . import order as _order
from ._proto import minibatch_pb2 as pb
from .errors import (
    FailedPrecondition,
    MinibatchError,
    NotFound,
    OutOfRange,
    ProtocolError,
    Unavailable,
    from_rpc_error,
)
from . import transport as _transport
from .transport import RPC_ERRORS, NativeUnaryStream, native_usable
from .dtypes import decode_x, dtype_code, dtype_name
from .wire import Batch, batches

T = TypeVar("T")

SERVICE = "minibatch.v1.BatchService"

# Channel options. The receive limit is lifted because the server decides
# message sizes (its --max-message-bytes).
DEFAULT_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.max_receive_message_length", -1),
)

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


# --- dataset description ------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    #: shape of one example; the set's tensor is (examples, *shape)
    shape: tuple[int, ...]
    sha256: str
    #: wire dtypes this tensor converts to exactly, the stored one first
    wire_dtypes: tuple[str, ...]
    #: for uint8 standing for floats: value = float32(byte) / scale_divisor
    scale_divisor: int


@dataclass(frozen=True)
class SetInfo:
    name: str
    examples: int
    x: TensorInfo
    y: TensorInfo
    classes: tuple[int, ...]


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_message_bytes: int
    chunk_bytes: int


@dataclass(frozen=True)
class DatasetInfo:
    source: str
    format: str
    fingerprint: str
    #: by name, in the server's order (train, valid, test)
    sets: dict[str, SetInfo]
    memory_bytes: int
    pinned: bool
    server_version: str
    limits: Limits
    #: the server that answered
    address: str = ""

    @staticmethod
    def from_proto(m: pb.DatasetInfo, address: str = "") -> "DatasetInfo":
        def tensor(t: pb.TensorInfo) -> TensorInfo:
            return TensorInfo(dtype_name(t.dtype), tuple(t.shape), t.sha256,
                              tuple(dtype_name(d) for d in t.wire_dtypes), t.scale_divisor)

        sets = {s.name: SetInfo(s.name, s.examples, tensor(s.x), tensor(s.y), tuple(s.classes)) for s in m.sets}
        lim = Limits(m.limits.max_batch_size, m.limits.max_message_bytes, m.limits.chunk_bytes)
        return DatasetInfo(m.source, m.format, m.fingerprint, sets, m.memory_bytes, m.pinned, m.server_version,
                           lim, address)


@dataclass(frozen=True)
class Failover:
    """One switch of an epoch stream to another server."""

    address: str
    #: the minibatch index the stream resumed from
    next_index: int
    error: str


# --- one server ----------------------------------------------------------------

def _normalize(address: str) -> tuple[str, bool]:
    """(grpc target, whether the scheme asked for TLS)."""
    for scheme, tls in (("http://", False), ("grpc://", False), ("https://", True), ("grpcs://", True)):
        if address.startswith(scheme):
            return address[len(scheme):].rstrip("/"), tls
    return address, False


def _read(v: Union[None, str, bytes, os.PathLike]) -> Optional[bytes]:
    """PEM given as bytes, or as a path to read."""
    if v is None or isinstance(v, bytes):
        return v
    with open(v, "rb") as f:
        return f.read()


class _Replica:
    def __init__(self, address: str, options: Sequence[tuple[str, object]],
                 credentials: Optional[grpc.ChannelCredentials], single_threaded: tuple[bool, bool],
                 use_native: bool = False, native_tls: Optional[dict] = None):
        self.address = address

        def channel(single: bool) -> grpc.Channel:
            opts = list(options) + ([SINGLE_THREADED] if single else [])
            if credentials is not None:
                return grpc.secure_channel(address, credentials, options=opts)
            return grpc.insecure_channel(address, options=opts)

        self.channel = channel(single_threaded[0])
        self.stream_channel = channel(single_threaded[1])
        ser = lambda m: m.SerializeToString()  # noqa: E731
        base = f"/{SERVICE}/"
        self.get_info = self.channel.unary_unary(base + "GetInfo", request_serializer=ser,
                                                 response_deserializer=pb.DatasetInfo.FromString)
        # Raw message bytes: parsed by wire.parse_chunk without a protobuf copy.
        self.get_batch = self.channel.unary_stream(base + "GetBatch", request_serializer=ser,
                                                   response_deserializer=None)
        self.stream_batches = self.stream_channel.unary_stream(base + "StreamBatches", request_serializer=ser,
                                                               response_deserializer=None)
        if use_native:
            # The tensor-carrying calls on the native transport, each kind on
            # its own connection (an epoch's prefetch thread and GetBatch
            # calls do not queue behind each other); GetInfo and health stay
            # on grpcio.
            tls_kw = native_tls or {}
            dial = _transport.native_address(address)
            self.get_batch = NativeUnaryStream(_transport.native.Channel(dial, **tls_kw), base + "GetBatch")
            self.stream_batches = NativeUnaryStream(_transport.native.Channel(dial, **tls_kw),
                                                    base + "StreamBatches")
        self.health = self.channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                               response_deserializer=None)
        self.fingerprint: Optional[str] = None

    def close(self):
        self.channel.close()
        self.stream_channel.close()


def _outputs(b: Batch, decode: bool, with_indices: bool):
    x = decode_x(b.x) if decode else b.x.array
    if with_indices:
        if b.indices is None:
            raise ProtocolError(f"minibatch {b.index} came without the indices asked for")
        return x, b.y.array, b.indices.array
    return x, b.y.array


def _order_msg(shuffle, seed, epoch, rank, world_size, drop_last) -> pb.Order:
    return pb.Order(shuffle=bool(shuffle), seed=int(seed), epoch=int(epoch), rank=int(rank),
                    world_size=int(world_size), drop_last=bool(drop_last))


# Errors after which a call moves on to the next server. UNAVAILABLE is a
# server that is down, restarting or unreachable (a killed server shows as
# "Socket closed" or "Connection reset"); a stream the server cut short
# (RST_STREAM, e.g. at shutdown past its grace period) shows as CANCELLED (this
# client cancels only calls it has finished with) or INTERNAL. GetBatch and
# StreamBatches are idempotent, so asking another replica is always safe.
_FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}


class Client:
    """A client of one minibatchd server, or of several replicas of it.

    ``Client("127.0.0.1:50051")`` or ``Client(["host1:50051", "host2:50051"])``
    (a comma-separated string works too). With several addresses, calls go
    round-robin across them, GetBatch moves on to the next server when one is
    unavailable, and `epoch()` resumes a broken stream on the next server from
    the next minibatch, so each minibatch is seen exactly once.

    timeout:        seconds for GetInfo and each GetBatch call (None: no limit).
    stream_timeout: seconds for a whole StreamBatches call (None: no limit).
    verify_crc:     check every chunk's CRC-32C (cheap with the `crc32c` package).
    check_replicas: with several addresses, check on first use that each server
                    holds the same dataset (GetInfo fingerprint).
    options:        extra grpcio channel options, appended to DEFAULT_OPTIONS.
    single_threaded_get_batch, single_threaded_stream: grpcio's
                    SingleThreadedUnaryStream mode for GetBatch and for
                    StreamBatches calls (the measured faster settings are the
                    defaults; see SINGLE_THREADED).
    native:         carry GetBatch and StreamBatches on the native transport
                    (package minibatch-client-native, built from
                    clients/python/native: tonic in Rust, about twice grpcio's
                    throughput here). None (default): when it is installed
                    and the target is host:port (plaintext, or TLS with tls_ca
                    given); True: insist
                    (ValueError if it cannot); False: grpcio only. With None,
                    the environment variable MINIBATCH_CLIENT_TRANSPORT=grpcio
                    or =native decides instead. `Client.transport` says which
                    one is in use.

    For a server started with --auth-token / --auth-token-file:
    token:          sent as "authorization: Bearer <token>" on every
                    BatchService call (the health check needs none).
    For a server with --tls-cert / --tls-key (TLS is on when any of these is
    given, or the address starts with https://):
    tls_ca:         PEM of the CA that signed the server's certificate (bytes
                    or a path; None: the bundled public roots, grpcio's own
                    or webpki-roots on the native transport).
    tls_cert, tls_key: PEM client certificate and key, for mutual TLS.
    tls_domain:     the name to verify in the server certificate (default: the
                    host of the address).
    """

    def __init__(self, address: Union[str, Sequence[str]], *, timeout: Optional[float] = 60.0,
                 stream_timeout: Optional[float] = None, verify_crc: bool = True, check_replicas: bool = True,
                 options: Sequence[tuple[str, object]] = (), token: Optional[str] = None,
                 tls_ca=None, tls_cert=None, tls_key=None, tls_domain: Optional[str] = None,
                 single_threaded_get_batch: bool = True, single_threaded_stream: bool = False,
                 native: Optional[bool] = None):
        if isinstance(address, str):
            addresses = [a.strip() for a in address.split(",") if a.strip()]
        else:
            addresses = [str(a).strip() for a in address]
        if not addresses:
            raise ValueError("no server address given")
        targets = [_normalize(a) for a in addresses]
        self.addresses = [t for t, _ in targets]
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together (mutual TLS)")
        tls = any(t for _, t in targets) or any(v is not None for v in (tls_ca, tls_cert, tls_domain))
        credentials = None
        extra: list[tuple[str, object]] = []
        pems = {"tls_ca": _read(tls_ca), "tls_cert": _read(tls_cert), "tls_key": _read(tls_key)}
        if tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=pems["tls_ca"],
                                                       private_key=pems["tls_key"],
                                                       certificate_chain=pems["tls_cert"])
            if tls_domain:
                extra.append(("grpc.ssl_target_name_override", tls_domain))
        self.tls = tls
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.verify_crc = verify_crc
        self.check_replicas = check_replicas and len(self.addresses) > 1
        self.options = tuple(DEFAULT_OPTIONS) + tuple(extra) + tuple(options)
        single = (single_threaded_get_batch, single_threaded_stream)
        why_not = next((w for w in map(native_usable, self.addresses) if w), None)
        if native and why_not:
            raise ValueError(f"native=True, but {why_not}")
        if native is None:
            # Operators can pick without touching code: "grpcio" or "native".
            env = os.environ.get("MINIBATCH_CLIENT_TRANSPORT", "").strip().lower()
            if env not in ("", "grpcio", "native"):
                raise ValueError(f"MINIBATCH_CLIENT_TRANSPORT={env!r}: use grpcio or native")
            native = {"": None, "grpcio": False, "native": True}[env]
            if native and why_not:
                raise ValueError(f"MINIBATCH_CLIENT_TRANSPORT=native, but {why_not}")
        use_native = why_not is None if native is None else bool(native)
        #: "native" or "grpcio": what carries GetBatch and StreamBatches
        self.transport = "native" if use_native else "grpcio"
        # Message size to ask for: grpcio measured fastest near 1 MiB (the
        # server's default, 0 here); the native transport, like the Rust
        # client, takes a minibatch's tensor best as one message (the server
        # caps this at its own limit).
        self._chunk_bytes = NATIVE_CHUNK_BYTES if use_native else 0
        native_tls = dict(pems, tls_domain=tls_domain, tls=True) if tls and use_native else None
        self._replicas = [_Replica(a, self.options, credentials, single, use_native, native_tls)
                          for a in self.addresses]
        self._lock = threading.Lock()
        self._next = 0
        self._fingerprint: Optional[tuple[str, str]] = None  # (fingerprint, address)
        self._info: Optional[DatasetInfo] = None
        #: address of the server that answered the latest call
        self.last_address: Optional[str] = None

    # -- plumbing --

    def close(self) -> None:
        for r in self._replicas:
            r.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.addresses!r})"

    def _pick(self) -> int:
        with self._lock:
            i = self._next
            self._next = (i + 1) % len(self._replicas)
            return i

    def _check_replica(self, r: _Replica) -> None:
        """With several servers: the first call to each checks that it holds
        the same dataset as the others, so a failover cannot change the data."""
        if not self.check_replicas or r.fingerprint is not None:
            return
        info = self._get_info(r)
        with self._lock:
            if self._fingerprint is None:
                self._fingerprint = (info.fingerprint, r.address)
            elif self._fingerprint[0] != info.fingerprint:
                fp, addr = self._fingerprint
                raise FailedPrecondition(
                    f"replicas hold different datasets: {addr} has fingerprint {fp[:16]}..., "
                    f"{r.address} has {info.fingerprint[:16]}...; every address given to one Client "
                    "must serve the same data", address=r.address)
            r.fingerprint = info.fingerprint

    def _get_info(self, r: _Replica) -> DatasetInfo:
        try:
            m = r.get_info(pb.GetInfoRequest(), timeout=self.timeout, metadata=self._metadata)
        except RPC_ERRORS as e:
            raise from_rpc_error(e, r.address) from None
        return DatasetInfo.from_proto(m, r.address)

    def _failover(self, fn: Callable[[_Replica], T]) -> T:
        """fn on the next server round-robin; if that server is unavailable (or
        cut the stream), on the others in turn."""
        start = self._pick()
        n = len(self._replicas)
        errors: list[MinibatchError] = []
        for k in range(n):
            r = self._replicas[(start + k) % n]
            try:
                self._check_replica(r)
                out = fn(r)
                self.last_address = r.address
                return out
            except MinibatchError as e:
                if e.code not in _FAILOVER_CODES:
                    raise
                errors.append(e)
        if n == 1:
            raise errors[0]
        raise Unavailable(f"all {n} servers are unavailable: " + "; ".join(str(e) for e in errors),
                          address=",".join(self.addresses))

    # -- API --

    def info(self) -> DatasetInfo:
        """GetInfo: the dataset (sets, shapes, dtypes, fingerprint) and the server's limits."""
        info = self._failover(self._get_info)
        self._info = info
        return info

    def num_batches(self, set: str, size: int, *, world_size: int = 0, drop_last: bool = False) -> int:
        """Minibatches of `size` in one epoch of `set` (per rank when sharded)."""
        if self._info is None:
            self.info()
        assert self._info is not None
        if set not in self._info.sets:
            raise NotFound(f"unknown set {set!r}; this dataset has {', '.join(self._info.sets)}",
                           address=self._info.address)
        return _order.num_batches(self._info.sets[set].examples, size, world_size=world_size, drop_last=drop_last)

    def health(self) -> dict[str, bool]:
        """grpc.health.v1 check of the BatchService on every address: True when SERVING."""
        name = SERVICE.encode()
        req = b"\x0a" + bytes([len(name)]) + name
        out = {}
        for r in self._replicas:
            try:
                resp = r.health(req, timeout=self.timeout)
                out[r.address] = resp == b"\x08\x01"  # status = SERVING
            except grpc.RpcError:
                out[r.address] = False
        return out

    def _one_batch(self, r: _Replica, req: pb.GetBatchRequest) -> Batch:
        one = getattr(r.get_batch, "one_batch", None)
        try:
            if one is not None:  # the native transport: the whole call in one step into Rust
                batch = one(req, timeout=self.timeout, metadata=self._metadata, verify_crc=self.verify_crc)
            else:
                batch = self._streamed_batch(r, req)
        except RPC_ERRORS as e:
            raise from_rpc_error(e, r.address) from None
        if batch.index != req.index:
            raise ProtocolError(f"asked for minibatch {req.index}, got {batch.index}", address=r.address)
        return batch

    def _streamed_batch(self, r: _Replica, req: pb.GetBatchRequest) -> Batch:
        """GetBatch's one minibatch from its stream of chunk messages."""
        batch = None
        call = r.get_batch(req, timeout=self.timeout, metadata=self._metadata)
        try:
            for b in batches(call, self.verify_crc):
                if batch is not None:
                    raise ProtocolError("GetBatch sent more than one minibatch", address=r.address)
                batch = b
        finally:
            call.cancel()  # no-op when complete; frees the stream on our errors
        if batch is None:
            raise ProtocolError("GetBatch stream ended without a minibatch", address=r.address)
        return batch

    def get_batch(self, set: str, index: int, size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                  rank: int = 0, world_size: int = 0, drop_last: bool = False, x_dtype=None, y_dtype=None,
                  with_indices: bool = False, decode: bool = False):
        """Minibatch `index` of `size` examples of `set`: (x, y), or
        (x, y, indices) with with_indices=True.

        x has the wire dtype: as stored (float32 for MNIST) unless x_dtype asks
        for "uint8", "float16", "bfloat16" (raw bits as uint16) or "float32".
        decode=True turns any of these into float32, exactly (uint8 bytes are
        divided by the server's scale divisor). y is as stored (int64) or int32.
        Arrays are writable, C-contiguous and little-endian.
        """
        req = pb.GetBatchRequest(set=set, index=int(index), size=int(size),
                                 order=_order_msg(shuffle, seed, epoch, rank, world_size, drop_last),
                                 x_dtype=dtype_code(x_dtype), y_dtype=dtype_code(y_dtype),
                                 with_indices=bool(with_indices), max_chunk_bytes=self._chunk_bytes)
        b = self._failover(lambda r: self._one_batch(r, req))
        return _outputs(b, decode, with_indices)

    def epoch(self, set: str, size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0,
              world_size: int = 0, drop_last: bool = False, start: int = 0, count: int = 0, x_dtype=None,
              y_dtype=None, with_indices: bool = False, decode: bool = False, prefetch: int = 2) -> "EpochIterator":
        """Iterates over the minibatches start, start+1, ... of one epoch
        (`count` of them; 0 = to the end) with one StreamBatches call, yielding
        (x, y) or (x, y, indices) as get_batch does.

        A background thread keeps up to `prefetch` minibatches ready
        (0: fetch on the caller's thread). If the server fails mid-epoch, the
        stream resumes on the next address from the next minibatch.
        Use it as a context manager, or call close(), to stop early.
        """
        req = pb.StreamBatchesRequest(set=set, size=int(size),
                                      order=_order_msg(shuffle, seed, epoch, rank, world_size, drop_last),
                                      x_dtype=dtype_code(x_dtype), y_dtype=dtype_code(y_dtype),
                                      with_indices=bool(with_indices), max_chunk_bytes=self._chunk_bytes)
        return EpochIterator(self, req, int(start), int(count), int(prefetch), bool(decode), bool(with_indices))


# --- epoch streams -----------------------------------------------------------------

class _End:
    pass


class _Raise:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Stream:
    """The state of one epoch stream, shared by EpochIterator and its prefetch
    thread. The thread holds only this object, never the EpochIterator, so an
    abandoned iterator is collected, and its __del__ stops the thread."""

    def __init__(self, client: Client, req: pb.StreamBatchesRequest, start: int, count: int, decode: bool,
                 with_indices: bool, prefetch: int):
        self.client = client
        self.req = req
        self.start = start
        self.count = count
        self.position = start
        self.decode = decode
        self.with_indices = with_indices
        self.failovers: list[Failover] = []
        self.address: Optional[str] = None
        self.call = None
        self.stop = threading.Event()
        self.queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))

    def batches(self) -> Iterator[Batch]:
        """Minibatches from position on, moving to the next server on failure."""
        client = self.client
        replicas = client._replicas
        n = len(replicas)
        k = client._pick()
        failed_in_a_row = 0
        resumed = False
        while not self.stop.is_set():
            if self.count and self.position - self.start >= self.count:
                return
            r = replicas[k]
            self.address = r.address
            req = pb.StreamBatchesRequest()
            req.CopyFrom(self.req)
            req.start = self.position
            req.count = self.count - (self.position - self.start) if self.count else 0
            progressed = False
            call = None
            try:
                client._check_replica(r)
                call = r.stream_batches(req, timeout=client.stream_timeout, metadata=client._metadata)
                self.call = call
                for b in batches(call, client.verify_crc):
                    if b.index != self.position:
                        raise ProtocolError(f"expected minibatch {self.position}, got {b.index}", address=r.address)
                    self.position += 1
                    progressed = True
                    client.last_address = r.address
                    yield b
                    if self.stop.is_set():
                        return
                return
            except RPC_ERRORS as e:
                if self.stop.is_set():
                    return
                err: MinibatchError = from_rpc_error(e, r.address)
            except MinibatchError as e:  # from the replica check (GetInfo)
                if e.code not in _FAILOVER_CODES:
                    raise
                err = e
            finally:
                if call is not None:
                    call.cancel()  # no-op when the call is complete
            if isinstance(err, OutOfRange) and resumed and self.position > self.start:
                # The failed server had sent every minibatch; only the end of
                # its stream was lost.
                return
            if err.code not in _FAILOVER_CODES or n == 1:
                raise err
            failed_in_a_row = 1 if progressed else failed_in_a_row + 1
            self.failovers.append(Failover(r.address, self.position, str(err)))
            if failed_in_a_row >= n:
                raise Unavailable(
                    f"no server could continue the epoch at minibatch {self.position}: "
                    + "; ".join(f.error for f in self.failovers[-n:]),
                    address=",".join(client.addresses))
            k = (k + 1) % n
            resumed = True

    def outputs(self, b: Batch):
        return _outputs(b, self.decode, self.with_indices)

    def run(self) -> None:
        """The prefetch thread: fills the queue, ends with _End or _Raise."""
        gen = self.batches()
        try:
            for b in gen:
                if not self.put(self.outputs(b)):
                    return
            self.put(_End())
        except BaseException as e:  # handed to the consumer
            self.put(_Raise(e))
        finally:
            gen.close()

    def put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def cancel(self) -> None:
        self.stop.set()
        call = self.call
        if call is not None:
            call.cancel()


class EpochIterator:
    """Iterator over one epoch's minibatches (see Client.epoch).

    position:  index of the next minibatch to receive from the server
    failovers: each switch to another server (address, resumed index, error)
    address:   the server now streaming
    """

    def __init__(self, client: Client, req: pb.StreamBatchesRequest, start: int, count: int, prefetch: int,
                 decode: bool, with_indices: bool):
        self.prefetch = max(prefetch, 0)
        self._s = _Stream(client, req, start, count, decode, with_indices, self.prefetch)
        self._closed = False
        self._gen: Optional[Iterator[Batch]] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def position(self) -> int:
        return self._s.position

    @property
    def failovers(self) -> list[Failover]:
        return self._s.failovers

    @property
    def address(self) -> Optional[str]:
        return self._s.address

    def __iter__(self) -> "EpochIterator":
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        if self.prefetch == 0:
            if self._gen is None:
                self._gen = self._s.batches()
            try:
                b = next(self._gen)
            except BaseException:
                self.close()
                raise
            return self._s.outputs(b)
        if self._thread is None:
            self._thread = threading.Thread(target=self._s.run, name="minibatch-prefetch", daemon=True)
            self._thread.start()
        item = self._s.queue.get()
        if isinstance(item, _End):
            self.close()
            raise StopIteration
        if isinstance(item, _Raise):
            self.close()
            raise item.exc
        return item

    def close(self) -> None:
        """Stops the stream: cancels the call and ends the prefetch thread."""
        if self._closed:
            return
        self._closed = True
        self._s.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if self._gen is not None:
            self._gen.close()

    def __enter__(self) -> "EpochIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
