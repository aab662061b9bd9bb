"""The transports under Client: grpcio (always installed) and the native one
(the optional `minibatch-client-native` package: tonic in Rust, see
clients/python/native), which Client picks by default when it is installed.

Both present the same calls: `unary_stream(request, timeout=, metadata=)`
returns an iterator of raw TensorChunk messages with `cancel()`, and a failed
call raises an error that `status_of` turns into (grpc.StatusCode, details).
Everything above (parsing, CRC checks, reassembly, failover) is shared.
"""
from __future__ import annotations

import re
from typing import Iterator, Optional, Sequence

import grpc

try:  # the optional native transport
    import minibatch_client_native as native
except ImportError:  # pragma: no cover - depends on what is installed
    native = None

#: every exception type a call can raise for a gRPC status
RPC_ERRORS: tuple[type[BaseException], ...] = (grpc.RpcError,) if native is None else (grpc.RpcError, native.RpcError)

_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}

# host:port, [v6]:port or a bare host: what the native transport dials.
_PLAIN_TARGET = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:\d+)?$")


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message of a failed call of either transport."""
    if native is not None and isinstance(e, native.RpcError):
        code, details = e.args
        return _BY_VALUE.get(code, grpc.StatusCode.UNKNOWN), details
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    return code, details


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


class _NativeCall:
    """A native call as the client uses it: `batches()` (whole minibatches,
    reassembled natively), or iterated, the raw messages as memoryviews.
    Like a grpcio call, it starts when iterated, so every failure (including
    the server refusing the request) surfaces from the iteration."""

    __slots__ = ("_start", "_call", "_cancelled")

    def __init__(self, start):
        self._start = start
        self._call = None
        self._cancelled = False

    def __iter__(self) -> Iterator[memoryview]:
        if self._cancelled:
            return
        self._call = self._start()
        for m in self._call:
            yield memoryview(m)

    def batches(self, verify_crc: bool = True) -> Iterator:
        """Whole minibatches (wire.Batch), reassembled and checked natively
        (tensor_chunks, the Rust client's rules) into writable buffers."""
        if self._cancelled:
            return
        self._call = call = self._start()
        while True:
            try:
                t = call.next_batch(verify_crc)
            except native.ChunkError as e:
                raise _chunk_error(e) from None
            if t is None:
                return
            yield _wire().batch_from_native(t)

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()


def _wire():
    # errors (which wire imports) imports this module: wire is imported late
    from . import wire

    return wire


def _chunk_error(e: BaseException) -> BaseException:
    """The client's ChecksumError or ProtocolError for a native ChunkError."""
    from .errors import ChecksumError, ProtocolError

    kind, message = e.args
    return (ChecksumError if kind == "checksum" else ProtocolError)(message)


class NativeUnaryStream:
    """A server-streaming method on a native channel, called like grpcio's
    multicallable with a protobuf request; `one_batch` is a whole GetBatch."""

    def __init__(self, channel, path: str):
        self._channel = channel
        self._path = path

    def __call__(self, request, timeout: Optional[float] = None,
                 metadata: Optional[Sequence[tuple[str, str]]] = None) -> _NativeCall:
        raw = request.SerializeToString()
        md = list(metadata) if metadata else None
        return _NativeCall(lambda: self._channel.unary_stream(self._path, raw, md, timeout))

    def one_batch(self, request, timeout: Optional[float] = None,
                  metadata: Optional[Sequence[tuple[str, str]]] = None, verify_crc: bool = True):
        """The call's one minibatch (wire.Batch), in one step into Rust."""
        try:
            t = self._channel.one_batch(self._path, request.SerializeToString(),
                                        list(metadata) if metadata else None, timeout, verify_crc)
        except native.ChunkError as e:
            raise _chunk_error(e) from None
        return _wire().batch_from_native(t)
