"""Attach on the device: the daemon's copy of the dataset in GPU memory
(`serve --device cuda:0 --uds PATH`), opened by CUDA IPC, as torch tensors.

    with Client("unix:///run/minibatchd/minibatchd.sock").attach(device="cuda:0") as a:
        x, y = a.batch("train", 2, 500)      # slices of the daemon's device memory: no copy
        for x, y in a.epoch("train", 500, shuffle=True, seed=1, epoch=0):
            ...                               # gathered on the device (index_select)

The attach exchange is the host one (attach.py) with `AttachRequest.device`
naming the GPU by UUID; the reply adds a DeviceCopy: one IPC handle per
file of the reply, whose allocation holds the same bytes at the same
offsets, so the host attachment's checked regions describe the device copy
too. This process opens each handle once (CuPy's ipcOpenMemHandle when
CuPy is installed, else cuIpcOpenMemHandle through ctypes with torch's
context current) and closes it on close(); tensors from the attachment must
not be used after that.

CUDA IPC mappings are writable: an in-place operation on a tensor from
batch() changes the daemon's copy for every trainer on the device (clone()
first). verify() copies every region to the host and checks its sha256.

The "emulated" backend (MINIBATCHD_DEVICE_BACKEND=emulated on the daemon,
for tests without a GPU) stands in host memory for the device: its handles
name a sealed memfd of the daemon's, and the tensors are CPU tensors.
"""
from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import struct
from typing import Iterator

import numpy as np

from ._proto import minibatch_pb2 as pb
from .errors import ChecksumError, FailedPrecondition, InvalidArgument, OutOfRange, ProtocolError

#: First bytes of an emulated handle (src/device/emulated.rs).
EMULATED_MAGIC = b"MBEMUL01"

# cuIpcOpenMemHandle's flag: map peer devices' memory lazily (the default).
_CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1

_TORCH_DTYPES = {
    "float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64",
    "uint8": "uint8", "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
    "uint16": "uint16", "uint32": "uint32", "uint64": "uint64", "bool": "bool",
}


def device_uuid(device) -> str:
    """The UUID ("GPU-...") of `device`: a UUID string as is, else a CUDA
    device (`"cuda:1"`, 1, torch.device) asked of torch, which numbers
    devices as this process sees them (CUDA_VISIBLE_DEVICES)."""
    if isinstance(device, str) and (device.upper().startswith("GPU-") or device.count("-") == 4):
        return device
    import torch

    d = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    if d.type != "cuda":
        raise InvalidArgument(f"device={device!r} is not a CUDA device (cuda:N, or a GPU UUID)")
    if not torch.cuda.is_available():
        raise FailedPrecondition(f"device={device!r}: this process sees no CUDA device (torch.cuda.is_available() "
                                 "is False); name the daemon's device by its UUID, or run where CUDA is")
    index = d.index if d.index is not None else torch.cuda.current_device()
    return "GPU-" + str(torch.cuda.get_device_properties(index).uuid)


def _torch_index(uuid: str) -> int:
    """This process's CUDA ordinal of the device with `uuid`."""
    import torch

    want = uuid.lower().removeprefix("gpu-")
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid).lower() == want:
            return i
    raise FailedPrecondition(f"the daemon's device {uuid} is not visible to this process "
                             "(CUDA_VISIBLE_DEVICES?)")


class _IpcHandle(ctypes.Structure):
    """CUipcMemHandle: 64 opaque bytes, passed by value."""

    _fields_ = [("reserved", ctypes.c_char * 64)]


class _CudaOpener:
    """Opens CUDA IPC handles on one device: CuPy when installed, else
    libcuda through ctypes (torch's primary context made current first)."""

    def __init__(self, uuid: str):
        import torch

        self.index = _torch_index(uuid)
        self.device = torch.device("cuda", self.index)
        torch.cuda.init()
        with torch.cuda.device(self.index):
            torch.empty(1, device=self.device)  # the primary context, current on this thread
        try:
            import cupy  # noqa: F401  (only whether it is installed)

            self._cupy = True
        except ImportError:
            self._cupy = False
            cuda = ctypes.CDLL("libcuda.so.1")
            # CUresult cuIpcOpenMemHandle_v2(CUdeviceptr*, CUipcMemHandle (64 bytes, by value), unsigned)
            cuda.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), _IpcHandle, ctypes.c_uint]
            cuda.cuIpcOpenMemHandle_v2.restype = ctypes.c_int
            cuda.cuIpcCloseMemHandle.argtypes = [ctypes.c_uint64]
            cuda.cuIpcCloseMemHandle.restype = ctypes.c_int
            self._cuda = cuda

    def open(self, handle: bytes, nbytes: int):
        """A uint8 torch tensor over the allocation, and a close function."""
        import torch

        with torch.cuda.device(self.index):
            if self._cupy:
                import cupy

                ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle)

                def close():
                    with cupy.cuda.Device(self.index):
                        cupy.cuda.runtime.ipcCloseMemHandle(ptr)
            else:
                dptr = ctypes.c_uint64(0)
                h = _IpcHandle.from_buffer_copy(handle)
                r = self._cuda.cuIpcOpenMemHandle_v2(ctypes.byref(dptr), h, _CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
                if r != 0:
                    raise FailedPrecondition(f"cuIpcOpenMemHandle failed with CUDA error {r} (the daemon's "
                                             "device memory must be on a device this process sees, and CUDA "
                                             "IPC needs both processes in one PID namespace)")
                ptr = dptr.value

                def close():
                    self._cuda.cuIpcCloseMemHandle(ptr)
            iface = _CudaArray(ptr, nbytes)
            t = torch.as_tensor(iface, device=self.device)
        return t, close


class _CudaArray:
    """Device memory as `__cuda_array_interface__` (version 3), for torch."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None, "stream": None}


class _EmulatedOpener:
    """Opens emulated handles: the daemon's sealed memfd, by /proc."""

    device = None

    def open(self, handle: bytes, nbytes: int):
        import torch

        if len(handle) != 64 or not handle.startswith(EMULATED_MAGIC):
            raise ProtocolError("an emulated device handle must be 64 bytes starting with MBEMUL01")
        pid, fd = struct.unpack_from("<II", handle, len(EMULATED_MAGIC))
        path = f"/proc/{pid}/fd/{fd}"
        f = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(f).st_size
            if size < nbytes:
                raise ProtocolError(f"emulated device memory {path} holds {size} bytes, the reply says {nbytes}")
            m = mmap.mmap(f, nbytes, access=mmap.ACCESS_READ) if nbytes else b""
        finally:
            os.close(f)
        arr = np.frombuffer(m, dtype=np.uint8, count=nbytes)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only memory: torch warns, and writes would fault
            t = torch.from_numpy(arr)

        def close():
            pass  # unmapped with the last tensor (the mmap's references)
        return t, close


class DeviceAttachment:
    """The daemon's device copy, mapped into this process (see the module
    docs): `batch`, `epoch`, `num_batches`, `sets`, `regions`,
    `fingerprint`, `generation`, `dataset`, `verify`, `close`, `stats`, as
    the host Attachment, yielding torch tensors on the device
    (`device_uuid`, `device_name`, `backend`, `device`: the torch device)."""

    def __init__(self, host, copy: pb.DeviceCopy):
        self._host = host
        self.address = host.address
        self.device_uuid = copy.uuid
        self.device_name = copy.name
        self.backend = copy.backend
        self._closers: list = []
        self._bases: list = []
        self._tensors: dict = {}
        if len(copy.allocations) != len(host._maps):
            raise ProtocolError(f"attach reply: the device copy has {len(copy.allocations)} allocations for "
                                f"{len(host._maps)} files", address=self.address)
        for i, (a, m) in enumerate(zip(copy.allocations, host._maps)):
            if a.bytes < len(m) and any(r.file == i and r.offset + r.length > a.bytes for r in host.regions):
                raise ProtocolError(f"attach reply: device allocation {i} holds {a.bytes} bytes, too few for "
                                    "its regions", address=self.address)
        if copy.backend == "emulated":
            opener = _EmulatedOpener()
        elif copy.backend == "cuda":
            opener = _CudaOpener(copy.uuid)
        else:
            raise ProtocolError(f"attach reply: unknown device backend {copy.backend!r}", address=self.address)
        self.device = opener.device
        try:
            for a in copy.allocations:
                t, close = opener.open(bytes(a.ipc_handle), int(a.bytes))
                self._bases.append(t)
                self._closers.append(close)
        except BaseException:
            self.close()
            raise

    # -- what the host attachment knows --

    @property
    def sets(self):
        return self._host.sets

    @property
    def regions(self):
        return self._host.regions

    @property
    def fingerprint(self) -> str:
        return self._host.fingerprint

    @property
    def generation(self) -> int:
        return self._host.generation

    @property
    def dataset(self) -> str:
        return self._host.dataset

    def stats(self, reset: bool = False):
        return self._host.stats(reset)

    def num_batches(self, set: str, size: int, **kw) -> int:
        return self._host.num_batches(set, size, **kw)

    def __enter__(self) -> "DeviceAttachment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DeviceAttachment({self.address!r}, {self.device_uuid}, {self.backend})"

    @property
    def closed(self) -> bool:
        return self._host.closed

    def close(self) -> None:
        """Closes the IPC handles and detaches. Tensors from this attachment
        must not be used afterwards (CUDA unmaps their memory)."""
        closers, self._closers = self._closers, []
        self._bases, self._tensors = [], {}
        for c in closers:
            c()
        self._host.close()

    # -- tensors --

    def _tensor(self, r):
        """Region `r` as a tensor over the device copy (cached)."""
        t = self._tensors.get(r)
        if t is None:
            if self.closed:
                raise ValueError("the attachment is closed")
            import torch

            base = self._bases[r.file][r.offset:r.offset + r.length]
            dt = getattr(torch, _TORCH_DTYPES[r.dtype])
            t = base.view(dt).reshape(tuple(r.shape)) if r.length else torch.empty(tuple(r.shape), dtype=dt,
                                                                                  device=base.device)
            self._tensors[r] = t
        return t

    def tensors(self, set: str):
        """(x, y) of the whole set, on the device."""
        s = self._host._set(set)
        return self._tensor(s.stored_x), self._tensor(s.y)

    def batch(self, set: str, index: int, size: int, *, decode: bool = False):
        """Minibatch `index` of `size` by the tutorial's rule, examples
        [index*size, min((index+1)*size, n)): slices of the device copy (no
        copy; decode=True converts uint8 x to float32 on the device)."""
        s = self._host._set(set)
        if size < 1:
            raise InvalidArgument("size must be at least 1", address=self.address)
        nb = -(-s.examples // int(size))
        if not 0 <= index < max(nb, 1) or (nb == 0 and index > 0):
            raise OutOfRange(f"minibatch {index} of size {size} is past the end: {set} has {nb}",
                             address=self.address)
        meter = self._host._meter
        t0 = meter.start()
        start, stop = int(index) * int(size), min((int(index) + 1) * int(size), s.examples)
        x, y = self.tensors(set)
        x, y = x[start:stop], y[start:stop]
        if decode:
            x = self._decode(x, s.stored_x)
        meter.stop(t0, x.nelement() * x.element_size() + y.nelement() * y.element_size(), minibatch=True)
        return x, y

    @staticmethod
    def _decode(x, r):
        import torch

        if r.dtype == "uint8" and r.scale_divisor:
            return x.to(torch.float32) / r.scale_divisor
        return x

    def epoch(self, set: str, size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0,
              world_size: int = 0, drop_last: bool = False, offset: int = 0, start: int = 0, count: int = 0,
              decode: bool = False) -> Iterator:
        """Minibatches of one epoch in the documented order (README "Order"),
        each gathered on the device (index_select) with the epoch's order
        uploaded once: bit for bit the host attachment's epoch()."""
        import torch

        from .attach import epoch_plan

        s = self._host._set(set)
        size = int(size)
        order, start, stop = epoch_plan(s.examples, size, self.address, shuffle=shuffle, seed=seed, epoch=epoch,
                                        rank=rank, world_size=world_size, drop_last=drop_last, offset=offset,
                                        start=start, count=count)
        x, y = self.tensors(set)
        idx = torch.as_tensor(np.ascontiguousarray(order, dtype=np.int64)).to(x.device)

        def gen():
            for i in range(start, stop):
                sel = idx[i * size:(i + 1) * size]
                bx = x.index_select(0, sel)
                yield (self._decode(bx, s.stored_x) if decode else bx), y.index_select(0, sel)
        return self._host._meter.iterate(gen(), _nbytes)

    def verify(self) -> bool:
        """Copies every region of the device copy to the host and compares
        its sha256 with the daemon's; ChecksumError names the first that
        differs. Returns True."""
        for r in self.regions:
            if r.file >= len(self._bases):
                continue
            t = self._bases[r.file][r.offset:r.offset + r.length]
            got = hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()
            if got != r.sha256:
                raise ChecksumError(f"device copy of region {r} ({self.device_uuid}): sha256 of its bytes is {got}, "
                                    f"the daemon declared {r.sha256}", address=self.address)
        return True


def _nbytes(b) -> int:
    return sum(t.nelement() * t.element_size() for t in b)


def attach(host, reply: pb.AttachReply):
    """A DeviceAttachment over the host attachment `host` made from `reply`."""
    if not reply.HasField("device"):
        raise ProtocolError("asked to attach on a device, the reply holds no device copy", address=host.address)
    return DeviceAttachment(host, reply.device)


__all__ = ["DeviceAttachment", "device_uuid"]
