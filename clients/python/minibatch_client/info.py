"""What GetInfo says about a server: its dataset (sets, shapes, dtypes,
fingerprint) and its limits, as frozen dataclasses.

Besides answering `Client.info()`, a server's description is what the client
checks that server's minibatches against (expect.Expected): the shape of one
example and the stored dtype of each tensor, and how many examples a set has.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ._proto import minibatch_pb2 as pb
from .dtypes import dtype_name


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
class DeviceInfo:
    """A dataset's copy in one GPU's memory (`serve --device`)."""

    #: "GPU-..." as nvidia-smi -L prints it: what attach(device=) matches
    uuid: str
    name: str
    bytes: int
    #: "cuda", or "emulated" (host memory standing in, in tests)
    backend: str


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
    #: the dataset's name on the daemon (what `Client(dataset=...)` names);
    #: empty when the daemon serves several and the client named none
    name: str = ""
    #: every dataset the daemon serves, by name, in its order (each described
    #: as above, without server_version and limits)
    datasets: dict[str, "DatasetInfo"] = field(default_factory=dict)
    #: its copies in device memory, one per GPU
    devices: tuple[DeviceInfo, ...] = ()

    @staticmethod
    def from_proto(m: pb.DatasetInfo, address: str = "") -> "DatasetInfo":
        def tensor(t: pb.TensorInfo) -> TensorInfo:
            return TensorInfo(dtype_name(t.dtype), tuple(t.shape), t.sha256,
                              tuple(dtype_name(d) for d in t.wire_dtypes), t.scale_divisor)

        sets = {s.name: SetInfo(s.name, s.examples, tensor(s.x), tensor(s.y), tuple(s.classes)) for s in m.sets}
        lim = Limits(m.limits.max_batch_size, m.limits.max_message_bytes, m.limits.chunk_bytes)
        datasets = {d.name: DatasetInfo.from_proto(d, address) for d in m.datasets}
        devices = tuple(DeviceInfo(d.uuid, d.name, d.bytes, d.backend) for d in m.devices)
        return DatasetInfo(m.source, m.format, m.fingerprint, sets, m.memory_bytes, m.pinned, m.server_version,
                           lim, address, m.name, datasets, devices)
