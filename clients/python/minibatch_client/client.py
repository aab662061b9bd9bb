"""Client for minibatchd's BatchService (proto/minibatch/v1/minibatch.proto):
connections to one server or several replicas, failover across them, and
the calls. What the calls return and check lives elsewhere: info.py (GetInfo),
expect.py and wire.py (checking and reassembling minibatches), transport.py
(grpcio or native), epoch.py (StreamBatches epochs).
"""
from __future__ import annotations

import os
import socket
import threading
import warnings
from typing import TYPE_CHECKING, Callable, Optional, Sequence, TypeVar, Union

import grpc
from google.protobuf.message import DecodeError

from . import addresses as _addresses
from . import order as _order
from . import stats as _stats
from ._proto import minibatch_pb2 as pb
from .dtypes import dtype_code
from .epoch import EpochIterator
from .errors import (
    FAILOVER_CODES,
    FailedPrecondition,
    InsecureTokenWarning,
    MinibatchError,
    NotFound,
    ProtocolError,
    Unavailable,
)
from .expect import Expected
from .info import DatasetInfo
from .stats import WaitStats
from .transport import (
    DEFAULT_OPTIONS,
    SERVICE,
    SINGLE_THREADED,  # noqa: F401  (public here since before transport.py had it)
    GrpcioTransport,
    NativeTransport,
    grpcio_channel,
    message_cap,
    minibatch_errors,
    use_native,
)

if TYPE_CHECKING:
    from .attach import Attachment

T = TypeVar("T")


def _read(v: Union[None, str, bytes, os.PathLike]) -> Optional[bytes]:
    """PEM given as bytes, or as a path to read."""
    if v is None or isinstance(v, bytes):
        return v
    with open(v, "rb") as f:
        return f.read()


class _Replica:
    """One server: a grpcio channel for GetInfo and the health check (and
    grpcio's GetBatch), the transport that carries minibatches, and the
    server's GetInfo once read."""

    def __init__(self, address: str, options: Sequence[tuple[str, object]],
                 credentials: Optional[grpc.ChannelCredentials], single_threaded: tuple[bool, bool],
                 metadata: Optional[Sequence[tuple[str, str]]], verify_crc: bool,
                 native_tls: Optional[dict]):
        """native_tls: None for grpcio, else the native transport's TLS settings ({} for plaintext)."""
        self.address = address
        self.channel = grpcio_channel(address, options, credentials, single_threaded[0])
        self._channels = [self.channel]
        self.transport: Union[GrpcioTransport, NativeTransport]
        if native_tls is None:
            stream_channel = grpcio_channel(address, options, credentials, single_threaded[1])
            self._channels.append(stream_channel)
            self.transport = GrpcioTransport(address, self.channel, stream_channel, metadata, verify_crc)
        else:
            self.transport = NativeTransport(address, metadata, verify_crc, native_tls, message_cap(options))
        # The answer as received (bytes): parsed here, and handed as is to
        # the transport (NativeTransport.learn).
        self.get_info = self.channel.unary_unary(f"/{SERVICE}/GetInfo",
                                                 request_serializer=pb.GetInfoRequest.SerializeToString,
                                                 response_deserializer=None)
        self.health = self.channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                               response_deserializer=None)
        #: this server's GetInfo as last read: what its minibatches are checked against
        self.info: Optional[DatasetInfo] = None

    def close(self):
        for c in self._channels:
            c.close()
        self.transport.close()


class Client:
    """A client of one minibatchd server, or of several replicas of it.

    ``Client("127.0.0.1:50051")`` or ``Client(["host1:50051", "host2:50051"])``
    (a comma-separated string works too). With several addresses, calls go
    round-robin across them, GetBatch moves on to the next server when one is
    unavailable, and `epoch()` resumes a broken stream on the next server from
    the next minibatch, so each minibatch is seen exactly once. Before its
    first minibatch from a server, the client reads that server's GetInfo;
    every minibatch is checked against it and the request (expect.py), and
    anything more or other is a ProtocolError.

    timeout:        seconds for GetInfo and each GetBatch call (None: no limit).
    stream_timeout: seconds for a whole StreamBatches call (None: no limit).
    verify_crc:     check every chunk's CRC-32C (cheap with the `crc32c` package).
    check_replicas: with several addresses, check on first use that each server
                    holds the same dataset (GetInfo fingerprint).
    options:        extra grpcio channel options; they override DEFAULT_OPTIONS
                    (e.g. ("grpc.max_receive_message_length", n) for a server
                    sending messages over MAX_RECEIVE_MESSAGE_BYTES; the
                    native transport takes that cap too).
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
                    BatchService call (the health check needs none). Without
                    TLS to an address that is not this machine, the Client
                    warns (InsecureTokenWarning) when it is made.
    For a server with --tls-cert / --tls-key (TLS is on when any of these is
    given, or the address starts with https://):
    tls_ca:         PEM of the CA that signed the server's certificate (bytes
                    or a path; None: the bundled public roots, grpcio's own
                    or webpki-roots on the native transport).
    tls_cert, tls_key: PEM client certificate and key, for mutual TLS.
    tls_domain:     the name to verify in the server certificate (default: the
                    host of the address).

    dataset:        which of the daemon's datasets this client reads (its
                    name, `serve --data NAME=PATH`; `info().datasets` lists
                    them). "" (default): the daemon's only one; a daemon
                    serving several refuses requests naming none
                    (InvalidArgument, listing the names). One Client reads
                    one dataset: make one per dataset.
    trainer_id:     how the daemon's status page (GET /status.json) names this
                    client's streams (the x-trainer-id header); default
                    "<host> pid <pid>" ("" sends none).
    stats:          wait accounting (stats.py): how long callers waited for
                    each minibatch of get_batch() and epoch() iterators
                    against the time between their calls; read it with
                    `stats()`. None (default): on unless the environment
                    says MINIBATCH_CLIENT_STATS=0; False: off (no clock
                    read at all).
    """

    def __init__(self, address: Union[str, Sequence[str]], *, timeout: Optional[float] = 60.0,
                 stream_timeout: Optional[float] = None, verify_crc: bool = True, check_replicas: bool = True,
                 options: Sequence[tuple[str, object]] = (), token: Optional[str] = None,
                 tls_ca=None, tls_cert=None, tls_key=None, tls_domain: Optional[str] = None,
                 single_threaded_get_batch: bool = True, single_threaded_stream: bool = False,
                 native: Optional[bool] = None, stats: Optional[bool] = None, dataset: str = "",
                 trainer_id: Optional[str] = None):
        targets = _addresses.targets(address)
        #: the daemon's dataset this client reads ("" = its only one)
        self.dataset = str(dataset)
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
        if token and not tls:
            remote = [a for a in self.addresses if not _addresses.is_local(a)]
            if remote:
                warnings.warn(
                    f"minibatch_client.Client sends its bearer token in plaintext to {', '.join(remote)}: "
                    "TLS is off and the address is not this machine, so anyone on the network path can read "
                    "the token. Serve with --tls-cert/--tls-key and pass tls_ca= (or an https:// address).",
                    InsecureTokenWarning, stacklevel=2)
        # Who this trainer is, for the daemon's status page (status.json's
        # streams): printable ASCII, cut to what the daemon keeps.
        trainer = trainer_id if trainer_id is not None else f"{socket.gethostname()} pid {os.getpid()}"
        trainer = "".join(c for c in str(trainer) if " " <= c <= "~")[:128]
        meta = [("x-trainer-id", trainer)] if trainer else []
        if token:
            meta.append(("authorization", f"Bearer {token}"))
        self._metadata = tuple(meta) or None
        self._token = token
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.verify_crc = verify_crc
        self.check_replicas = check_replicas and len(self.addresses) > 1
        # One value per key, the caller's winning: grpcio would take the first.
        self.options = tuple({**dict(DEFAULT_OPTIONS), **dict(extra), **dict(options)}.items())
        single = (single_threaded_get_batch, single_threaded_stream)
        native = use_native(native, self.addresses)
        kind = NativeTransport if native else GrpcioTransport
        #: "native" or "grpcio": what carries GetBatch and StreamBatches
        self.transport = kind.name
        self._chunk_bytes = kind.chunk_bytes
        native_tls = None  # grpcio
        if native:
            native_tls = dict(pems, tls_domain=tls_domain, tls=True) if tls else {}
        self._replicas = [_Replica(a, self.options, credentials, single, self._metadata, verify_crc, native_tls)
                          for a in self.addresses]
        self._lock = threading.Lock()
        self._next = 0
        self._fingerprint: Optional[tuple[str, str]] = None  # (fingerprint, address)
        self._info: Optional[DatasetInfo] = None
        #: address of the server that answered the latest call
        self.last_address: Optional[str] = None
        # What callers waited for minibatches (get_batch and epoch iterators).
        self._meter = _stats.meter(stats)

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

    def _read_info(self, r: _Replica) -> DatasetInfo:
        """GetInfo from r, now. Kept as what r's minibatches are checked
        against, and handed to r's transport (the native one bounds by it
        too); with several servers, first checked to describe the same
        dataset as the others, so that a failover cannot change the data."""
        with minibatch_errors(r.address):
            raw = r.get_info(pb.GetInfoRequest(dataset=self.dataset), timeout=self.timeout,
                             metadata=self._metadata)
        try:
            m = pb.DatasetInfo.FromString(raw)
        except DecodeError as e:
            raise ProtocolError(f"the GetInfo answer is not a valid DatasetInfo: {e}", address=r.address) from None
        info = DatasetInfo.from_proto(m, r.address)
        if self.check_replicas:
            with self._lock:
                if self._fingerprint is None:
                    self._fingerprint = (info.fingerprint, r.address)
                elif self._fingerprint[0] != info.fingerprint:
                    fp, addr = self._fingerprint
                    raise FailedPrecondition(
                        f"replicas hold different datasets: {addr} has fingerprint {fp[:16]}..., "
                        f"{r.address} has {info.fingerprint[:16]}...; every address given to one Client "
                        "must serve the same data", address=r.address)
        r.transport.learn(raw)
        r.info = info
        return info

    def _described(self, r: _Replica) -> DatasetInfo:
        """r's GetInfo, read before the first minibatch from r: no server's
        minibatch is believed without it (expect.py). Read once per Client; a
        server restarted with other data needs a new Client."""
        return r.info if r.info is not None else self._read_info(r)

    def _failover(self, fn: Callable[[_Replica], T]) -> T:
        """fn on the next server round-robin; if that server is unavailable (or
        cut the stream), on the others in turn."""
        start = self._pick()
        n = len(self._replicas)
        errors: list[MinibatchError] = []
        for k in range(n):
            r = self._replicas[(start + k) % n]
            try:
                out = fn(r)
                self.last_address = r.address
                return out
            except MinibatchError as e:
                if e.code not in FAILOVER_CODES:
                    raise
                errors.append(e)
        if n == 1:
            raise errors[0]
        raise Unavailable(f"all {n} servers are unavailable: " + "; ".join(str(e) for e in errors),
                          address=",".join(self.addresses))

    # -- API --

    def stats(self, reset: bool = False) -> WaitStats:
        """What this client's callers waited for their minibatches, over
        get_batch() and every epoch() iterator, since the client was made or
        last reset: minibatches, bytes, wait and busy (between-calls)
        seconds, wait_fraction, per-minibatch wait p50/p99, and the
        prefetch queue's use (see stats.WaitStats). reset=True starts a new
        period at the same time (e.g. one per epoch). All zeros when
        accounting is off (stats=False, MINIBATCH_CLIENT_STATS=0)."""
        return self._meter.snapshot(reset)

    def reset_stats(self) -> None:
        """Starts the wait accounting afresh (stats())."""
        self._meter.reset()

    def info(self) -> DatasetInfo:
        """GetInfo: the dataset (sets, shapes, dtypes, fingerprint), the
        server's limits, and (`datasets`) every dataset the daemon serves."""
        info = self._failover(self._read_info)
        self._info = info
        return info

    def num_batches(self, set: str, size: int, *, world_size: int = 0, drop_last: bool = False,
                    offset: int = 0) -> int:
        """Minibatches of `size` in one epoch of `set` (per rank when sharded;
        of the positions [offset, n) of the epoch's order with `offset`)."""
        if self._info is None:
            self.info()
        assert self._info is not None
        if set not in self._info.sets:
            raise NotFound(f"unknown set {set!r}; this dataset has {', '.join(self._info.sets)}",
                           address=self._info.address)
        return _order.num_batches(self._info.sets[set].examples, size, world_size=world_size, drop_last=drop_last,
                                  offset=offset)

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

    def get_batch(self, set: str, index: int, size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                  rank: int = 0, world_size: int = 0, drop_last: bool = False, offset: int = 0, x_dtype=None,
                  y_dtype=None, with_indices: bool = False, decode: bool = False):
        """Minibatch `index` of `size` examples of `set`: (x, y), or
        (x, y, indices) with with_indices=True.

        The order (README "Order"): shuffle/seed/epoch, sharded by
        rank/world_size, from position `offset` of the epoch's order (the
        positions all ranks together consumed before: elastic resume).

        x has the wire dtype: as stored (float32 for MNIST) unless x_dtype asks
        for "uint8", "float16", "bfloat16" (raw bits as uint16) or "float32".
        decode=True turns any of these into float32, exactly (uint8 bytes are
        divided by the server's scale divisor). y is as stored (int64) or int32.
        Arrays are writable, C-contiguous and little-endian.
        """
        req = pb.GetBatchRequest(dataset=self.dataset, set=set, index=int(index), size=int(size),
                                 order=_order_msg(shuffle, seed, epoch, rank, world_size, drop_last, offset),
                                 x_dtype=dtype_code(x_dtype), y_dtype=dtype_code(y_dtype),
                                 with_indices=bool(with_indices), max_chunk_bytes=self._chunk_bytes)
        meter = self._meter
        t0 = meter.start()
        try:
            b = self._failover(
                lambda r: r.transport.get_batch(req, Expected.get_batch(req, self._described(r)), self.timeout))
            out = b.arrays(decode, with_indices)
        except BaseException:
            meter.stop(t0)  # the caller waited for the failure too
            raise
        meter.stop(t0, _stats.nbytes(out), minibatch=True)
        return out

    def epoch(self, set: str, size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0,
              world_size: int = 0, drop_last: bool = False, offset: int = 0, start: int = 0, count: int = 0,
              x_dtype=None, y_dtype=None, with_indices: bool = False, decode: bool = False,
              prefetch: int = 2) -> "EpochIterator":
        """Iterates over the minibatches start, start+1, ... of one epoch
        (`count` of them; 0 = to the end) with one StreamBatches call, yielding
        (x, y) or (x, y, indices) as get_batch does.

        `offset` resumes the epoch after positions [0, offset) of its order
        were consumed by all ranks together, possibly in another world size
        (README "Order": after k whole minibatches of `size` on every rank of
        a world of w, resume at offset + k*size*w; see order.resume_offset).
        `start` counts minibatches of this (offset) order.

        A background thread keeps up to `prefetch` minibatches ready
        (0: fetch on the caller's thread). If the server fails mid-epoch, the
        stream resumes on the next address from the next minibatch.
        Use it as a context manager, or call close(), to stop early.
        """
        req = pb.StreamBatchesRequest(dataset=self.dataset, set=set, size=int(size),
                                      order=_order_msg(shuffle, seed, epoch, rank, world_size, drop_last,
                                                       offset),
                                      x_dtype=dtype_code(x_dtype), y_dtype=dtype_code(y_dtype),
                                      with_indices=bool(with_indices), max_chunk_bytes=self._chunk_bytes)
        return EpochIterator(self, req, int(start), int(count), int(prefetch), bool(decode), bool(with_indices),
                             self._meter)

    def attach(self, x_dtype=None, *, name: Optional[str] = None, device=None):
        """Maps the daemon's resident dataset into this process (same host,
        over the daemon's Unix socket: an address `unix:///PATH` of a daemon
        run with --uds PATH): an Attachment, whose minibatches are read-only
        views of the daemon's own memory (see attach.py). x_dtype="uint8"
        maps the daemon's uint8 mirror of x as well and returns it as x.
        device="cuda:0" (or a GPU UUID) maps the daemon's copy in that GPU's
        memory (`serve --device`) instead: a device.DeviceAttachment whose
        minibatches are torch tensors on the device.
        With several addresses, the Unix sockets among them are tried in
        turn; with none, FailedPrecondition (attach passes memory by
        descriptor, which TCP cannot carry)."""
        from . import attach as _attach

        sockets = [a for a in self.addresses if _attach.socket_path(a) is not None]
        if not sockets:
            raise FailedPrecondition(
                f"cannot attach over {', '.join(self.addresses)}: attach passes the dataset's memory by descriptor, "
                "which works only over the daemon's Unix socket on the same host (serve --uds PATH; "
                "Client(\"unix:///PATH\"))", address=",".join(self.addresses))
        errors: list[MinibatchError] = []
        for target in sockets:
            try:
                return _attach.connect(target, token=self._token, x_dtype=x_dtype, timeout=self.timeout, name=name,
                                       stats=self._meter.enabled, dataset=self.dataset, device=device)
            except Unavailable as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise Unavailable("no daemon socket could be attached to: " + "; ".join(str(e) for e in errors),
                          address=",".join(sockets))


def _order_msg(shuffle, seed, epoch, rank, world_size, drop_last, offset=0) -> pb.Order:
    return pb.Order(shuffle=bool(shuffle), seed=int(seed), epoch=int(epoch), rank=int(rank),
                    world_size=int(world_size), drop_last=bool(drop_last), offset=int(offset))
