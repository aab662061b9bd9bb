from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT64: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]
    DTYPE_UINT8: _ClassVar[Dtype]
    DTYPE_INT8: _ClassVar[Dtype]
    DTYPE_INT16: _ClassVar[Dtype]
    DTYPE_UINT16: _ClassVar[Dtype]
    DTYPE_INT32: _ClassVar[Dtype]
    DTYPE_UINT32: _ClassVar[Dtype]
    DTYPE_INT64: _ClassVar[Dtype]
    DTYPE_UINT64: _ClassVar[Dtype]
    DTYPE_BOOL: _ClassVar[Dtype]
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT64: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_BFLOAT16: Dtype
DTYPE_UINT8: Dtype
DTYPE_INT8: Dtype
DTYPE_INT16: Dtype
DTYPE_UINT16: Dtype
DTYPE_INT32: Dtype
DTYPE_UINT32: Dtype
DTYPE_INT64: Dtype
DTYPE_UINT64: Dtype
DTYPE_BOOL: Dtype

class GetInfoRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("source", "format", "fingerprint", "sets", "memory_bytes", "pinned", "server_version", "limits", "name", "datasets")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SETS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    source: str
    format: str
    fingerprint: str
    sets: _containers.RepeatedCompositeFieldContainer[SetInfo]
    memory_bytes: int
    pinned: bool
    server_version: str
    limits: Limits
    name: str
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, source: _Optional[str] = ..., format: _Optional[str] = ..., fingerprint: _Optional[str] = ..., sets: _Optional[_Iterable[_Union[SetInfo, _Mapping]]] = ..., memory_bytes: _Optional[int] = ..., pinned: _Optional[bool] = ..., server_version: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., name: _Optional[str] = ..., datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...

class SetInfo(_message.Message):
    __slots__ = ("name", "examples", "x", "y", "classes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    examples: int
    x: TensorInfo
    y: TensorInfo
    classes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., examples: _Optional[int] = ..., x: _Optional[_Union[TensorInfo, _Mapping]] = ..., y: _Optional[_Union[TensorInfo, _Mapping]] = ..., classes: _Optional[_Iterable[int]] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("dtype", "shape", "sha256", "wire_dtypes", "scale_divisor")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    SCALE_DIVISOR_FIELD_NUMBER: _ClassVar[int]
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    sha256: str
    wire_dtypes: _containers.RepeatedScalarFieldContainer[Dtype]
    scale_divisor: int
    def __init__(self, dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., sha256: _Optional[str] = ..., wire_dtypes: _Optional[_Iterable[_Union[Dtype, str]]] = ..., scale_divisor: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_batch_size", "max_message_bytes", "chunk_bytes")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_message_bytes: int
    chunk_bytes: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class Order(_message.Message):
    __slots__ = ("shuffle", "seed", "epoch", "rank", "world_size", "drop_last", "offset")
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    DROP_LAST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    shuffle: bool
    seed: int
    epoch: int
    rank: int
    world_size: int
    drop_last: bool
    offset: int
    def __init__(self, shuffle: _Optional[bool] = ..., seed: _Optional[int] = ..., epoch: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., drop_last: _Optional[bool] = ..., offset: _Optional[int] = ...) -> None: ...

class GetBatchRequest(_message.Message):
    __slots__ = ("set", "index", "size", "order", "x_dtype", "y_dtype", "with_indices", "max_chunk_bytes", "dataset")
    SET_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    X_DTYPE_FIELD_NUMBER: _ClassVar[int]
    Y_DTYPE_FIELD_NUMBER: _ClassVar[int]
    WITH_INDICES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    set: str
    index: int
    size: int
    order: Order
    x_dtype: Dtype
    y_dtype: Dtype
    with_indices: bool
    max_chunk_bytes: int
    dataset: str
    def __init__(self, set: _Optional[str] = ..., index: _Optional[int] = ..., size: _Optional[int] = ..., order: _Optional[_Union[Order, _Mapping]] = ..., x_dtype: _Optional[_Union[Dtype, str]] = ..., y_dtype: _Optional[_Union[Dtype, str]] = ..., with_indices: _Optional[bool] = ..., max_chunk_bytes: _Optional[int] = ..., dataset: _Optional[str] = ...) -> None: ...

class StreamBatchesRequest(_message.Message):
    __slots__ = ("set", "size", "order", "start", "count", "x_dtype", "y_dtype", "with_indices", "max_chunk_bytes", "dataset")
    SET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    X_DTYPE_FIELD_NUMBER: _ClassVar[int]
    Y_DTYPE_FIELD_NUMBER: _ClassVar[int]
    WITH_INDICES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    set: str
    size: int
    order: Order
    start: int
    count: int
    x_dtype: Dtype
    y_dtype: Dtype
    with_indices: bool
    max_chunk_bytes: int
    dataset: str
    def __init__(self, set: _Optional[str] = ..., size: _Optional[int] = ..., order: _Optional[_Union[Order, _Mapping]] = ..., start: _Optional[int] = ..., count: _Optional[int] = ..., x_dtype: _Optional[_Union[Dtype, str]] = ..., y_dtype: _Optional[_Union[Dtype, str]] = ..., with_indices: _Optional[bool] = ..., max_chunk_bytes: _Optional[int] = ..., dataset: _Optional[str] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("index", "name", "dtype", "shape", "offset", "data", "crc32c", "total_bytes", "scale_divisor", "last")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SCALE_DIVISOR_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    crc32c: int
    total_bytes: int
    scale_divisor: int
    last: bool
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ..., total_bytes: _Optional[int] = ..., scale_divisor: _Optional[int] = ..., last: _Optional[bool] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("token", "x_dtypes", "client", "dataset")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    X_DTYPES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    token: str
    x_dtypes: _containers.RepeatedScalarFieldContainer[Dtype]
    client: str
    dataset: str
    def __init__(self, token: _Optional[str] = ..., x_dtypes: _Optional[_Iterable[_Union[Dtype, str]]] = ..., client: _Optional[str] = ..., dataset: _Optional[str] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("attached", "error")
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    attached: AttachReply
    error: AttachError
    def __init__(self, attached: _Optional[_Union[AttachReply, _Mapping]] = ..., error: _Optional[_Union[AttachError, _Mapping]] = ...) -> None: ...

class AttachError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class AttachReply(_message.Message):
    __slots__ = ("fingerprint", "generation", "server_version", "files", "regions", "dataset")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    generation: int
    server_version: str
    files: _containers.RepeatedCompositeFieldContainer[SharedFile]
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    dataset: str
    def __init__(self, fingerprint: _Optional[str] = ..., generation: _Optional[int] = ..., server_version: _Optional[str] = ..., files: _Optional[_Iterable[_Union[SharedFile, _Mapping]]] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ..., dataset: _Optional[str] = ...) -> None: ...

class SharedFile(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("set", "tensor", "dtype", "shape", "file", "offset", "length", "sha256", "scale_divisor")
    SET_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SCALE_DIVISOR_FIELD_NUMBER: _ClassVar[int]
    set: str
    tensor: str
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    file: int
    offset: int
    length: int
    sha256: str
    scale_divisor: int
    def __init__(self, set: _Optional[str] = ..., tensor: _Optional[str] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., file: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., sha256: _Optional[str] = ..., scale_divisor: _Optional[int] = ...) -> None: ...
