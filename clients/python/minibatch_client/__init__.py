"""Python client for minibatchd: minibatches of an in-memory dataset over gRPC.

    from minibatch_client import Client
    with Client("127.0.0.1:50051") as c:
        x, y = c.get_batch("train", 2, 500)            # float32 [500, 784], int64 [500]
        for x, y in c.epoch("train", 600, shuffle=True, seed=1, epoch=0):
            ...

See README.md in this package's source folder (clients/python).
"""
from .client import (
    DEFAULT_OPTIONS,
    SINGLE_THREADED,
    Client,
    DatasetInfo,
    EpochIterator,
    Failover,
    Limits,
    SetInfo,
    TensorInfo,
)
from .dtypes import decode_x
from .errors import (
    ChecksumError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MinibatchError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ProtocolError,
    Unauthenticated,
    Unavailable,
)
from .order import SplitMix64, batch_indices, epoch_order, num_batches, permutation

__version__ = "0.1.0"

__all__ = [
    "Client", "DatasetInfo", "SetInfo", "TensorInfo", "Limits", "EpochIterator", "Failover", "DEFAULT_OPTIONS", "SINGLE_THREADED",
    "MinibatchError", "NotFound", "OutOfRange", "InvalidArgument", "FailedPrecondition", "Unavailable",
    "DeadlineExceeded", "Unauthenticated", "PermissionDenied", "ChecksumError", "ProtocolError",
    "permutation", "batch_indices", "epoch_order", "num_batches", "SplitMix64", "decode_x",
]
