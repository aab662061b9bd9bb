"""Attach: map the daemon's resident dataset itself, on the same host.

    with Client("unix:///run/minibatchd/minibatchd.sock").attach() as a:
        x, y = a.batch("train", 2, 500)      # read-only views of the daemon's memory: no copy
        for x, y in a.epoch("train", 500, shuffle=True, seed=1, epoch=0):
            ...                               # gathered into fresh arrays

The daemon keeps the dataset in sealed memfds. On its Unix socket (`serve
--uds`) a client sends an AttachRequest and receives, in one message, an
AttachResponse and the memfds' descriptors (SCM_RIGHTS); it maps them
read-only, and a minibatch is a slice of the mapping. The exchange (framing
in proto/minibatch/v1/minibatch.proto, above AttachRequest):

    client -> daemon: b"MBATTACH" | u32le 1 | u32le n | AttachRequest  (n <= 4096)
    daemon -> client: b"MBATTACH" | u32le 1 | u32le m | AttachResponse (+ descriptors)

The connection then stays open and is the attachment (the daemon counts
attached processes by open connections); closing it detaches. The mappings
stay valid after that, and after the daemon exits: the kernel keeps a memfd
while anything maps it.

The server's word is not taken: every descriptor must be a memfd sealed
against growing, shrinking and writing (so the mapping can neither change
size under us, SIGBUS, nor be written through a new mapping), at least as
large as declared; every region must lie in its file with the length its
dtype and shape imply; the sets must be consistent (x and y with the same
examples, each tensor once); the stored tensors' sha256s must make up the
fingerprint. `Attachment.verify()` recomputes the sha256 of every region's
bytes. Anything else is a ProtocolError naming the field, and every
descriptor received is closed on every path.
"""
from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import mmap
import os
import socket
import stat
import struct
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from google.protobuf.message import DecodeError

from . import order as _order
from . import stats as _stats
from ._proto import minibatch_pb2 as pb
from .dtypes import DTYPES, decode_x, dtype_code, dtype_name
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
    Unavailable,
    for_code_number,
)

MAGIC = b"MBATTACH"
VERSION = 1
HEADER = struct.Struct("<8sII")
#: Largest request the daemon reads.
MAX_REQUEST_BYTES = 4096
#: Largest reply this client reads (MNIST's is under 2 KiB).
MAX_REPLY_BYTES = 1 << 20
#: Most descriptors one message can carry (the kernel's SCM_MAX_FD).
MAX_FILES = 253

# fcntl seals (linux/fcntl.h); Python's fcntl lacks F_SEAL_FUTURE_WRITE.
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
F_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x0008)
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)

_FD_BYTES = array.array("i").itemsize


def socket_path(target: str) -> Optional[str]:
    """The Unix socket path of a grpc-style target (`unix:///abs/path`,
    `unix:/abs/path`, `unix:relative/path`, `unix-abstract:name`), None for
    anything else (host:port, dns:, ...)."""
    if target.startswith("unix-abstract:"):
        return "\0" + target[len("unix-abstract:"):]
    if target.startswith("unix://"):
        return target[len("unix://"):]
    if target.startswith("unix:"):
        return target[len("unix:"):]
    return None


@dataclass(frozen=True)
class Region:
    """One tensor as a byte range of one of the shared files (the proto's
    Region): `shape` is the full shape, (examples, ...)."""

    set: str
    tensor: str
    dtype: str
    shape: tuple[int, ...]
    file: int
    offset: int
    length: int
    sha256: str
    #: for uint8 standing for floats: value = float32(byte) / scale_divisor (0: none)
    scale_divisor: int

    @property
    def examples(self) -> int:
        return self.shape[0]

    def __str__(self) -> str:
        return f"{self.set}/{self.tensor} ({self.dtype} {list(self.shape)})"


@dataclass(frozen=True)
class AttachedSet:
    """A set as attached: `x` is the x that batch() and epoch() return (the
    uint8 mirror when attached with x_dtype="uint8"), `stored_x` the x as the
    daemon stores it (the same Region when no other dtype was asked for)."""

    name: str
    examples: int
    x: Region
    y: Region
    stored_x: Region


def _request(token: Optional[str], x_dtypes: Sequence[int], name: str, dataset: str = "",
             device: str = "") -> bytes:
    body = pb.AttachRequest(token=token or "", x_dtypes=list(x_dtypes), client=name[:128],
                            dataset=dataset, device=device).SerializeToString()
    if len(body) > MAX_REQUEST_BYTES:
        raise InvalidArgument(f"the attach request is {len(body)} bytes, over the protocol's limit of "
                              f"{MAX_REQUEST_BYTES} (a token that long?)")
    return HEADER.pack(MAGIC, VERSION, len(body)) + body


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def read_reply(sock: socket.socket, address: str = "") -> tuple[pb.AttachResponse, list[int]]:
    """Reads one attach reply from `sock`: the AttachResponse and the
    descriptors that came with it (close-on-exec; the caller owns them).
    Bounds the reply (MAX_REPLY_BYTES) and the descriptors (MAX_FILES; a
    truncated set of them, MSG_CTRUNC, is an error); on any error every
    descriptor received is closed."""
    fds: list[int] = []
    buf = bytearray()
    need = HEADER.size
    room = socket.CMSG_SPACE(MAX_FILES * _FD_BYTES)
    try:
        while len(buf) < need:
            try:
                data, anc, flags, _ = sock.recvmsg(need - len(buf), room, socket.MSG_CMSG_CLOEXEC)
            except socket.timeout:
                raise DeadlineExceeded("no attach reply from the daemon within the timeout", address=address) from None
            except ConnectionResetError:
                data, anc, flags = b"", [], 0
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(cdata[: len(cdata) - len(cdata) % _FD_BYTES])
                    fds.extend(got)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"the daemon passed more than {MAX_FILES} descriptors (MSG_CTRUNC)",
                                    address=address)
            if not data:
                if buf:
                    raise ProtocolError(f"the daemon closed the connection {len(buf)} bytes into a "
                                        f"{need}-byte attach reply", address=address)
                raise Unavailable("the daemon closed the connection without an attach reply (a daemon "
                                  "without attach, or one that refused the connection)", address=address)
            buf += data
            if need == HEADER.size and len(buf) == HEADER.size:
                magic, version, m = HEADER.unpack(bytes(buf))
                if magic != MAGIC:
                    raise ProtocolError(f"the reply does not start with {MAGIC!r} but {magic!r}: is this socket "
                                        "a minibatchd with attach (--uds)?", address=address)
                if version != VERSION:
                    raise ProtocolError(f"attach reply of protocol version {version}; this client speaks "
                                        f"{VERSION}", address=address)
                if m > MAX_REPLY_BYTES:
                    raise ProtocolError(f"attach reply length {m} exceeds this client's limit of "
                                        f"{MAX_REPLY_BYTES} bytes", address=address)
                need += m
        try:
            resp = pb.AttachResponse.FromString(bytes(buf[HEADER.size:]))
        except DecodeError as e:
            raise ProtocolError(f"the attach reply is not a valid AttachResponse: {e}", address=address) from None
        return resp, fds
    except BaseException:
        _close_all(fds)
        raise


def _connect(path: str, timeout: Optional[float], address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except socket.timeout:
        sock.close()
        raise DeadlineExceeded(f"connecting to {path} timed out", address=address) from None
    except PermissionError as e:
        sock.close()
        raise PermissionDenied(f"cannot connect to the daemon's socket {path}: {e.strerror} (the socket file's "
                               "mode and group say who may attach)", address=address) from None
    except OSError as e:
        sock.close()
        raise Unavailable(f"cannot connect to the daemon's socket {path}: {e.strerror or e}", address=address) \
            from None
    return sock


def connect(target: str, *, token: Optional[str] = None, x_dtype=None, timeout: Optional[float] = 60.0,
            name: Optional[str] = None, stats: Optional[bool] = None, dataset: str = "",
            device=None):
    """Attaches to the daemon at `target` (`unix:///path/to.sock`, or the
    path itself): see Attachment. `token`: the daemon's bearer token, if it
    has one. `x_dtype`: None, or "uint8" for the daemon's uint8 mirror of
    x (an error where a set's x is not exactly uint8). `timeout` bounds the
    exchange (seconds; None: no limit). `name` goes to the daemon's log.
    `stats`: wait accounting (Attachment.stats(); None: on unless
    MINIBATCH_CLIENT_STATS=0). `dataset`: which of the daemon's datasets
    (its name; "" = the only one). `device`: also map the daemon's copy on
    that GPU (`"cuda:0"`, an ordinal, a torch.device or a "GPU-..." UUID;
    `serve --device`): a device.DeviceAttachment yielding torch tensors on
    the device, instead of an Attachment."""
    path = socket_path(target)
    if path is None:
        if "://" in target or not target.startswith(("/", ".")):
            raise FailedPrecondition(
                f"cannot attach to {target}: attach passes the dataset's memory by descriptor, which works only "
                "over the daemon's Unix socket on the same host (serve --uds PATH; address it as "
                "unix:///PATH)", address=target)
        path = target
    code = dtype_code(x_dtype)
    uuid = ""
    if device is not None:
        from .device import device_uuid

        uuid = device_uuid(device)
    sock = _connect(path, timeout, target)
    fds: list[int] = []
    try:
        req = _request(token, [code] if code else [], name or f"python {socket.gethostname()} pid {os.getpid()}",
                       dataset, uuid)
        try:
            sock.sendall(req)
        except socket.timeout:
            raise DeadlineExceeded("sending the attach request timed out", address=target) from None
        except OSError:
            pass  # the daemon may have answered and closed already: read its reply
        resp, fds = read_reply(sock, target)
        kind = resp.WhichOneof("result")
        if kind == "error":
            raise for_code_number(resp.error.code, resp.error.message or "(no message)", target)
        if kind != "attached":
            raise ProtocolError("the attach reply holds neither `attached` nor `error`", address=target)
        sock.settimeout(None)
        if dataset and resp.attached.dataset != dataset:
            raise ProtocolError(f"asked to attach dataset {dataset!r}, the daemon described "
                                f"{resp.attached.dataset!r}", address=target)
        a = Attachment(resp.attached, fds, sock, target, code, stats=stats)
        fds = []  # the Attachment closed them
        if uuid:
            from . import device as _device

            try:
                return _device.attach(a, resp.attached)
            except BaseException:
                a.close()
                raise
        return a
    except BaseException:
        _close_all(fds)
        sock.close()
        raise


class Attachment:
    """The daemon's dataset, mapped read-only into this process.

    - `batch(set, index, size)`: minibatch `index` of `size` by the
      tutorial's rule, examples [index*size, min((index+1)*size, n)), as
      zero-copy read-only numpy views of the shared memory.
    - `epoch(set, size, shuffle=, seed=, epoch=, rank=, world_size=,
      drop_last=, offset=)`: the documented order (README "Order"), each minibatch
      gathered into fresh writable arrays; bit for bit what Client.epoch()
      gets over gRPC.
    - `fingerprint`, `generation` (differs for every daemon start),
      `server_version`, `sets` (name -> AttachedSet: examples, x and y
      Regions with dtype and full shape), `regions`, `verify()`.
    - `stats()`: what the caller waited for batch() and epoch() minibatches
      against the time between them (stats.WaitStats). Attached, the wait
      is a view's few microseconds or an epoch's gather (a memcpy of the
      minibatch): a fraction near 0 says the data is not the bottleneck.

    The socket stays open while attached; `close()` (or leaving a `with`
    block) detaches and unmaps the files once no array from them is left
    (otherwise they are unmapped when the last one is garbage collected).
    Arrays stay valid after close() and after the daemon exits.
    """

    def __init__(self, reply: pb.AttachReply, fds: list[int], sock: socket.socket, address: str, x_code: int, *,
                 stats: Optional[bool] = None):
        """Checks `reply` and the descriptors, maps them and closes the
        descriptors (on every path). Use connect() or Client.attach()."""
        self.address = address
        self._meter = _stats.meter(stats)
        self._sock: Optional[socket.socket] = sock
        self._maps: list[Union[mmap.mmap, bytes]] = []
        # whole-set views (arrays()) and byte rows (_rows()), made on first use
        self._full: dict = {}
        #: the dataset's name on the daemon, as DatasetInfo.name
        self.dataset: str = reply.dataset
        #: the dataset's fingerprint, as DatasetInfo.fingerprint
        self.fingerprint: str = reply.fingerprint
        #: differs for every start of a daemon
        self.generation: int = reply.generation
        self.server_version: str = reply.server_version
        self.regions: tuple[Region, ...] = ()
        self.sets: dict[str, AttachedSet] = {}
        # per region: (numpy dtype, elements per example)
        self._layout: dict[Region, tuple[np.dtype, int]] = {}
        try:
            self._check_files(reply, fds)
            self.regions = tuple(self._check_region(i, r, reply) for i, r in enumerate(reply.regions))
            self.sets = self._sets(x_code)
            self._check_fingerprint(reply.fingerprint)
            self._layout = {r: (DTYPES[dtype_code(r.dtype)][1], int(np.prod(r.shape[1:], dtype=np.int64)))
                            for r in self.regions}
            for fd, f in zip(fds, reply.files):
                self._maps.append(_map(fd, f.bytes))
        except BaseException:
            self._unmap()
            raise
        finally:
            _close_all(fds)

    # -- checks --

    def _bad(self, why: str) -> ProtocolError:
        return ProtocolError(f"attach reply: {why}", address=self.address)

    def _check_files(self, reply: pb.AttachReply, fds: list[int]) -> None:
        if len(fds) != len(reply.files):
            raise self._bad(f"{len(reply.files)} files declared but {len(fds)} descriptors passed")
        for i, (fd, f) in enumerate(zip(fds, reply.files)):
            try:
                st = os.fstat(fd)
            except OSError as e:
                raise self._bad(f"files[{i}]: fstat failed: {e.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise self._bad(f"files[{i}] is not a regular file (mode {st.st_mode:o}): not a memfd")
            try:
                seals = fcntl.fcntl(fd, F_GET_SEALS)
            except OSError as e:
                raise self._bad(f"files[{i}] has no seals (F_GET_SEALS: {e.strerror}): not a sealed memfd") \
                    from None
            missing = [n for n, bit in (("F_SEAL_SHRINK", F_SEAL_SHRINK), ("F_SEAL_GROW", F_SEAL_GROW)) if not seals & bit]
            if not seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
                missing.append("F_SEAL_WRITE or F_SEAL_FUTURE_WRITE")
            if missing:
                raise self._bad(f"files[{i}] is not sealed against {', '.join(missing)} (seals {seals:#x}): its "
                                "contents or size could change under the mapping")
            if st.st_size < f.bytes:
                raise self._bad(f"files[{i}].bytes is {f.bytes} but the file has {st.st_size} bytes")

    def _check_region(self, i: int, r: pb.Region, reply: pb.AttachReply) -> Region:
        where = f"regions[{i}] ({r.set}/{r.tensor})"
        if not r.set:
            raise self._bad(f"regions[{i}].set is empty")
        if r.tensor not in ("x", "y"):
            raise self._bad(f"{where}.tensor is {r.tensor!r}, not \"x\" or \"y\"")
        if r.dtype not in DTYPES:
            raise self._bad(f"{where}.dtype {r.dtype} is not a dtype this client knows")
        if len(r.shape) < 1:
            raise self._bad(f"{where}.shape is empty: a tensor's shape starts with its examples")
        if r.file >= len(reply.files):
            raise self._bad(f"{where}.file is {r.file}, but there are {len(reply.files)} files")
        size = reply.files[r.file].bytes
        if r.offset > size or r.length > size - r.offset:
            raise self._bad(f"{where}: offset {r.offset} + length {r.length} lies outside files[{r.file}] "
                            f"({size} bytes)")
        itemsize = DTYPES[r.dtype][1].itemsize
        want = int(np.prod(r.shape, dtype=object)) * itemsize
        if r.length != want:
            raise self._bad(f"{where}.length is {r.length}, but shape {list(r.shape)} of {dtype_name(r.dtype)} "
                            f"is {want} bytes")
        if len(r.sha256) != 64 or any(c not in "0123456789abcdef" for c in r.sha256):
            raise self._bad(f"{where}.sha256 is not 64 lowercase hex digits: {r.sha256[:80]!r}")
        return Region(r.set, r.tensor, dtype_name(r.dtype), tuple(r.shape), r.file, r.offset, r.length, r.sha256,
                      r.scale_divisor)

    def _sets(self, x_code: int) -> dict[str, AttachedSet]:
        """Each set's x (the stored one, and the one asked for) and y, checked
        to be there once each and to agree on the examples."""
        asked = dtype_name(x_code) if x_code else None
        by_set: dict[str, list[Region]] = {}
        for r in self.regions:
            by_set.setdefault(r.set, []).append(r)
        if not by_set:
            raise self._bad("no regions: the dataset has no sets")
        out = {}
        for name, regions in by_set.items():
            seen = set()
            for r in regions:
                if (r.tensor, r.dtype) in seen:
                    raise self._bad(f"set {name!r} has {r.tensor} as {r.dtype} twice")
                seen.add((r.tensor, r.dtype))
            ys = [r for r in regions if r.tensor == "y"]
            xs = [r for r in regions if r.tensor == "x"]
            if len(ys) != 1:
                raise self._bad(f"set {name!r} has {len(ys)} y regions, not 1")
            stored = [r for r in xs if r.dtype != asked]
            wanted = [r for r in xs if r.dtype == asked] if asked else []
            if len(stored) > 1 or (not stored and not wanted):
                raise self._bad(f"set {name!r} has x as {', '.join(r.dtype for r in xs) or 'nothing'}: expected "
                                f"the stored x{' and its ' + asked + ' copy' if asked else ''}")
            if asked and not wanted:
                raise self._bad(f"set {name!r} has no x as {asked}, which was asked for (x_dtypes)")
            x = wanted[0] if wanted else stored[0]
            stored_x = stored[0] if stored else x
            y = ys[0]
            for r in xs:
                if r.shape != stored_x.shape:
                    raise self._bad(f"set {name!r}: x as {r.dtype} has shape {list(r.shape)}, the stored x "
                                    f"{list(stored_x.shape)}")
            if x.examples != y.examples:
                raise self._bad(f"set {name!r}: x has {x.examples} examples but y has {y.examples}")
            out[name] = AttachedSet(name, y.examples, x, y, stored_x)
        return out

    def _check_fingerprint(self, fingerprint: str) -> None:
        """The stored tensors' lines (README "Fingerprint") must hash to the
        fingerprint: the description is the one of the dataset it names."""
        h = hashlib.sha256()
        for s in self.sets.values():
            for r in (s.stored_x, s.y):
                h.update(f"{s.name} {r.tensor} {r.dtype} {','.join(map(str, r.shape))} {r.sha256}\n".encode())
        if h.hexdigest() != fingerprint:
            raise self._bad(f"fingerprint {fingerprint[:16]}... is not the sha256 of the regions' description "
                            f"({h.hexdigest()[:16]}...)")

    # -- plumbing --

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else "attached"
        return (f"Attachment({self.address!r}, {state}, generation {self.generation}, "
                f"sets {', '.join(self.sets)})")

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        """Detaches (closes the socket) and unmaps what no array uses any
        more; arrays still alive keep their mapping until collected."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._full = {}
        self._unmap()

    def _unmap(self) -> None:
        for m in self._maps:
            if isinstance(m, mmap.mmap):
                try:
                    m.close()
                except BufferError:
                    pass  # numpy views of it exist: unmapped when the last one is collected
        self._maps = []

    def fileno(self) -> int:
        """The attachment's socket (for select/poll: readable at EOF when the daemon is gone)."""
        if self._sock is None:
            raise ValueError("the attachment is closed")
        return self._sock.fileno()

    # -- data --

    def stats(self, reset: bool = False) -> "_stats.WaitStats":
        """What callers waited for this attachment's minibatches (batch()
        and epoch() iterators) since it was made or last reset; reset=True
        starts a new period. See stats.WaitStats."""
        return self._meter.snapshot(reset)

    def reset_stats(self) -> None:
        """Starts the wait accounting afresh (stats())."""
        self._meter.reset()

    def _set(self, set: str) -> AttachedSet:
        if self._sock is None:
            raise ValueError("the attachment is closed")
        s = self.sets.get(set)
        if s is None:
            raise NotFound(f"unknown set {set!r}; this dataset has {', '.join(self.sets)}", address=self.address)
        return s

    def _view(self, r: Region, start: int, stop: int) -> np.ndarray:
        """Examples [start, stop) of region r: a read-only view of the mapping."""
        dt, per = self._layout[r]
        # frombuffer, not ndarray(buffer=): frombuffer holds a buffer export
        # on the mmap for the array's life, so mmap.close() cannot unmap
        # memory a view still points at (it raises BufferError instead);
        # ndarray(buffer=) releases the export at once.
        a = np.frombuffer(self._maps[r.file], dtype=dt, count=(stop - start) * per,
                          offset=r.offset + start * per * dt.itemsize)
        return a.reshape((stop - start,) + r.shape[1:])

    def _rows(self, r: Region) -> tuple[np.ndarray, np.dtype, tuple[int, ...]]:
        """Region r as rows of bytes, one per example: numpy gathers those
        at memcpy speed wherever the region starts, where a gather of
        float32 rows that are not 4-byte aligned takes a slow path (~8x);
        with the dtype and the shape of one example to view them back as."""
        rows = self._full.get((r, "rows"))
        if rows is None:
            dt, per = self._layout[r]
            b = np.frombuffer(self._maps[r.file], dtype=np.uint8, count=r.length, offset=r.offset)
            rows = self._full[(r, "rows")] = b.reshape(r.examples, per * dt.itemsize)
        return rows, self._layout[r][0], r.shape[1:]

    def arrays(self, set: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole of `set`: (x, y) as read-only views of the mapping."""
        s = self._set(set)
        full = self._full.get(set)
        if full is None:
            full = self._full[set] = (self._view(s.x, 0, s.examples), self._view(s.y, 0, s.examples))
        return full

    def batch(self, set: str, index: int, size: int, *, decode: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Minibatch `index` of `size`: examples [index*size, min((index+1)*size, n))
        of `set`, as (x, y) read-only numpy views of the shared memory (no
        copy). decode=True turns uint8 x (x_dtype="uint8") into float32
        x / scale_divisor, exactly the stored values (a new array)."""
        meter = self._meter
        t0 = meter.start()
        try:
            s = self._set(set)
            index, size = int(index), int(size)
            _check_size(size, self.address)
            nb = -(-s.examples // size)
            if not 0 <= index < nb:
                raise OutOfRange(f"minibatch {index} is past the end: this order has {nb} minibatches of size "
                                 f"{size} (indices 0..{nb})", address=self.address)
            start, stop = index * size, min((index + 1) * size, s.examples)
            x = self._view(s.x, start, stop)
            if decode:
                x = _decode(x, s.x)
            y = self._view(s.y, start, stop)
        except BaseException:
            meter.stop(t0)
            raise
        meter.stop(t0, x.nbytes + y.nbytes, minibatch=True)
        return x, y

    def num_batches(self, set: str, size: int, *, world_size: int = 0, drop_last: bool = False,
                    offset: int = 0) -> int:
        """Minibatches of `size` in one epoch of `set` (per rank when sharded;
        of the positions [offset, n) of the epoch's order with `offset`)."""
        s = self._set(set)
        _check_order(s.examples, size, 0, world_size, self.address, offset)
        return _order.num_batches(s.examples, size, world_size=world_size, drop_last=drop_last, offset=offset)

    def epoch(self, set: str, size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0,
              world_size: int = 0, drop_last: bool = False, offset: int = 0, start: int = 0, count: int = 0,
              decode: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Minibatches start, start+1, ... (`count` of them, 0 = to the end)
        of one epoch in the documented order (README "Order"; `offset`:
        resumed after positions [0, offset) of it), each (x, y) gathered into
        fresh writable arrays: the same minibatches, bit for bit, as
        Client.epoch() with the same arguments."""
        s = self._set(set)
        order, start, stop = epoch_plan(s.examples, int(size), self.address, shuffle=shuffle, seed=seed,
                                        epoch=epoch, rank=rank, world_size=world_size, drop_last=drop_last,
                                        offset=offset, start=start, count=count)
        return self._meter.iterate(_gather(self._rows(s.x), self._rows(s.y), order, int(size), start, stop,
                                           s.x if decode else None), _stats.nbytes)

    def verify(self) -> bool:
        """Recomputes the sha256 of every region's bytes and compares it with
        the daemon's; raises ChecksumError naming the first region that
        differs. Returns True."""
        if self._sock is None:
            raise ValueError("the attachment is closed")
        for r in self.regions:
            h = hashlib.sha256()
            with memoryview(self._maps[r.file]) as mv, mv[r.offset:r.offset + r.length] as part:
                h.update(part)
            got = h.hexdigest()
            if got != r.sha256:
                raise ChecksumError(f"region {r} in file {r.file} at {r.offset}: sha256 of its bytes is {got}, the "
                                    f"daemon declared {r.sha256}", address=self.address)
        return True


def epoch_plan(examples: int, size: int, address: str, *, shuffle: bool, seed: int, epoch: int, rank: int,
               world_size: int, drop_last: bool, offset: int, start: int, count: int):
    """(order, start, stop) of an attached epoch: the example order of one
    epoch of a set of `examples` (README "Order") and the minibatches
    [start, stop) of `size` to take from it, checked as the server checks a
    StreamBatches request, with its messages."""
    offset, start, count = int(offset), int(start), int(count)
    _check_order(examples, size, rank, world_size, address, offset)
    nb = _order.num_batches(examples, size, world_size=world_size, drop_last=drop_last, offset=offset)
    if start < 0 or count < 0:
        raise InvalidArgument("start and count must not be negative", address=address)
    if start > nb or (start == nb and nb > 0):
        raise OutOfRange(f"start {start} is past the end: this order has {nb} minibatches", address=address)
    stop = nb if count == 0 else min(nb, start + count)
    order = _order.epoch_order(examples, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                               world_size=world_size, offset=offset)
    return order, start, stop


def _gather(xr, yr, order, size, start, stop, decode_region):
    """Minibatches start..stop of `order`, each gathered from the byte rows
    (Attachment._rows) into fresh arrays."""
    def take(rows, idx):
        b, dt, shape = rows
        return b.take(idx, axis=0).view(dt).reshape((len(idx),) + shape)

    for i in range(start, stop):
        idx = order[i * size:(i + 1) * size]
        x = take(xr, idx)
        if decode_region is not None:
            x = _decode(x, decode_region)
        yield x, take(yr, idx)


def _decode(x: np.ndarray, r: Region) -> np.ndarray:
    return decode_x(SimpleNamespace(array=x, dtype=r.dtype, scale_divisor=r.scale_divisor))


def _check_size(size: int, address: str) -> None:
    if size < 1:
        raise InvalidArgument("size must be at least 1", address=address)


def _check_order(n: int, size: int, rank: int, world_size: int, address: str, offset: int = 0) -> None:
    """The server's checks of an order (src/order.rs), with its messages."""
    _check_size(int(size), address)
    w = max(int(world_size), 1)
    if not 0 <= rank < w:
        raise InvalidArgument(f"rank {rank} is not below world_size {w}", address=address)
    if w > max(n, 1):
        raise InvalidArgument(f"world_size {w} exceeds the {n} examples of the set: some shards would be empty",
                              address=address)
    why = _order.offset_error(n, int(offset))
    if why is not None:
        raise InvalidArgument(why, address=address)


def _map(fd: int, size: int) -> Union[mmap.mmap, bytes]:
    """A read-only shared mapping of the first `size` bytes of fd."""
    if size == 0:
        return b""  # nothing to map (mmap refuses length 0)
    try:
        if sys.version_info >= (3, 13):
            return mmap.mmap(fd, size, access=mmap.ACCESS_READ, trackfd=False)
        # Before 3.13, mmap keeps a dup of fd until it is closed.
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    except OSError as e:
        raise MinibatchError(f"mapping an attached file failed: {e.strerror or e}"
                             + (" (out of address space?)" if e.errno == errno.ENOMEM else "")) from None
