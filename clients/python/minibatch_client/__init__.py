"""Python client for minibatchd: minibatches of an in-memory dataset over gRPC.

    from minibatch_client import Client
    with Client("127.0.0.1:50051") as c:
        x, y = c.get_batch("train", 2, 500)            # float32 [500, 784], int64 [500]
        for x, y in c.epoch("train", 600, shuffle=True, seed=1, epoch=0):
            ...
        print(c.stats())                               # how long this process waited for data (stats.py)
    with Client("unix:///run/minibatchd.sock").attach() as a:   # same host: map the daemon's memory
        x, y = a.batch("train", 2, 500)                # read-only views, no copy

See README.md in this package's source folder (clients/python).
"""
from .attach import AttachedSet, Attachment, Region
from .client import Client
from .dtypes import decode_x
from .epoch import EpochIterator, Failover
from .errors import (
    ChecksumError,
    DeadlineExceeded,
    FailedPrecondition,
    InsecureTokenWarning,
    InvalidArgument,
    MinibatchError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .info import DatasetInfo, Limits, SetInfo, TensorInfo
from .order import SplitMix64, batch_indices, epoch_order, num_batches, permutation, resume_offset
from .stats import WaitMeter, WaitStats
from .transport import DEFAULT_OPTIONS, MAX_RECEIVE_MESSAGE_BYTES, SINGLE_THREADED

__version__ = "0.1.0"

__all__ = [
    "Client", "Attachment", "AttachedSet", "Region", "DatasetInfo", "SetInfo", "TensorInfo", "Limits", "EpochIterator", "Failover", "DEFAULT_OPTIONS", "SINGLE_THREADED",
    "MAX_RECEIVE_MESSAGE_BYTES", "WaitStats", "WaitMeter",
    "MinibatchError", "NotFound", "OutOfRange", "InvalidArgument", "FailedPrecondition", "Unavailable",
    "DeadlineExceeded", "Unauthenticated", "PermissionDenied", "ResourceExhausted", "ChecksumError", "ProtocolError", "InsecureTokenWarning",
    "permutation", "batch_indices", "epoch_order", "num_batches", "resume_offset", "SplitMix64", "decode_x",
]
