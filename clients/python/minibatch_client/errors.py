"""Exceptions: one class per gRPC status code the server documents, plus the
client's own findings about a server's stream; and the client's warning.

Each also derives from the closest built-in exception, so generic code can
catch it too (``except IndexError`` for a minibatch index past the end).

    MinibatchError                        any failure talking to minibatchd
    ├── NotFound(LookupError)             unknown set
    ├── OutOfRange(IndexError)            minibatch index / stream start past the end
    ├── InvalidArgument(ValueError)       size 0, size over the limit, rank >= world_size, ...
    ├── FailedPrecondition                wire dtype that would not be exact (e.g. labels as uint8)
    ├── Unavailable(ConnectionError)      server down or unreachable (after trying every address)
    ├── DeadlineExceeded(TimeoutError)    the call's timeout passed
    ├── Unauthenticated(PermissionError)  missing or wrong bearer token (server run with --auth-token*)
    ├── PermissionDenied(PermissionError)
    ├── ResourceExhausted                 a limit of the server (e.g. --max-attached)
    ├── ChecksumError                     a chunk failed its CRC-32C check, or attached
    │                                     memory its sha256 (Attachment.verify)
    └── ProtocolError                     the server's stream broke the chunk protocol or
                                          sent more, or other, than the request asked for

This module imports nothing of the package: every other module raises these,
and each transport turns its own failures into them (`for_status`).
"""
from __future__ import annotations

from typing import Optional

import grpc


class MinibatchError(Exception):
    """A failed call. `code` is the gRPC status code (None for errors found by
    the client itself), `details` the server's message, `address` the server."""

    code: Optional[grpc.StatusCode] = None

    def __init__(self, details: str, *, code: Optional[grpc.StatusCode] = None, address: Optional[str] = None):
        self.details = details
        if code is not None:
            self.code = code
        self.address = address
        super().__init__(details)

    def __str__(self) -> str:
        parts = []
        if self.code is not None:
            parts.append(self.code.name)
        if self.address:
            parts.append(f"from {self.address}")
        return f"{self.details} ({', '.join(parts)})" if parts else self.details


class NotFound(MinibatchError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class OutOfRange(MinibatchError, IndexError):
    code = grpc.StatusCode.OUT_OF_RANGE


class InvalidArgument(MinibatchError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(MinibatchError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(MinibatchError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(MinibatchError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(MinibatchError, PermissionError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MinibatchError, PermissionError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(MinibatchError):
    """A limit of the server was reached (too many attached processes,
    --max-attached; a message over the size limit)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ChecksumError(MinibatchError):
    """A chunk's data does not match its CRC-32C (corrupted in transit), or
    attached memory does not match its region's sha256 (Attachment.verify)."""


class ProtocolError(MinibatchError):
    """The stream broke the chunk protocol (order, offsets, lengths, fields),
    or declared more or other than the request asked for (sizes, shapes,
    dtypes, minibatches)."""


_BY_CODE = {
    cls.code: cls
    for cls in (NotFound, OutOfRange, InvalidArgument, FailedPrecondition, Unavailable, DeadlineExceeded,
                Unauthenticated, PermissionDenied, ResourceExhausted)
}

# gRPC status code numbers (as the attach protocol's AttachError.code carries
# them) -> grpc.StatusCode.
_CODE_NUMBERS = {c.value[0]: c for c in grpc.StatusCode}


# Errors after which a call moves on to the next server. UNAVAILABLE is a
# server that is down, restarting or unreachable (a killed server shows as
# "Socket closed" or "Connection reset"); a stream the server cut short
# (RST_STREAM, e.g. at shutdown past its grace period) shows as CANCELLED (this
# client cancels only calls it has finished with) or INTERNAL. GetBatch and
# StreamBatches are idempotent, so asking another replica is always safe.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL})


def for_status(code: grpc.StatusCode, details: str, address: Optional[str] = None) -> MinibatchError:
    """The MinibatchError for a call that failed with gRPC status `code`."""
    return _BY_CODE.get(code, MinibatchError)(details, code=code, address=address)


def for_code_number(number: int, details: str, address: Optional[str] = None) -> MinibatchError:
    """The MinibatchError for gRPC status code `number` (an AttachError's
    code): the same table as for_status; a number that is no failure code
    (0 = OK, or unknown) is the server's ProtocolError."""
    code = _CODE_NUMBERS.get(number)
    if code is None or code == grpc.StatusCode.OK:
        return ProtocolError(f"the server reported an error with status code {number}, which is not a gRPC "
                             f"failure code: {details}", address=address)
    return for_status(code, details, address)


class InsecureTokenWarning(UserWarning):
    """A bearer token is about to travel in plaintext to a host that is not
    this machine (TLS off, an address that is not loopback)."""
