"""Attach (issue 12): same-host trainers map the daemon's resident dataset
through its Unix socket, with the Python client's Attachment.

Against real daemons (`serve --uds`): the bytes equal the bundled sample
and what GetBatch and StreamBatches send (shuffled, sharded, uint8 too);
minibatches are zero-copy read-only views; the passed memfds are sealed (a
writable mapping, ftruncate, write and hole punching all fail); the data
outlives the daemon, and a restarted daemon is a new generation; the token
applies and TCP is refused; garbage after the magic, unread replies,
descriptors sent to the daemon, 10,000 attach cycles and the --max-attached
limit leave the daemon serving with the descriptors it had.

Against a fake daemon (tests/python/attach_raw.py): the client takes no
server's word: unsealed or short files, regions outside their file or of the
wrong length, inconsistent sets, a wrong fingerprint, oversized or broken
replies are ProtocolErrors naming the field, with no descriptor leaked; the
error codes map to the client's exceptions; verify() finds corrupt bytes.

Run: python3 -m pytest tests/python/test_attach.py  (after `cargo build`)
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import gzip
import hashlib
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import sys
import time

import numpy as np
import pytest

from paths import ROOT, SAMPLE
sys.path.insert(0, str(ROOT / "clients" / "python"))

import minibatch_client as mc  # noqa: E402
from minibatch_client._proto import minibatch_pb2 as pb  # noqa: E402
from attach_raw import (  # noqa: E402
    ALL_SEALS, F_SEAL_FUTURE_WRITE, FakeDaemon, exchange, frame, memfd, open_fds, recv_reply, settle_fds,
)
from test_client import EXAMPLES, Daemon  # noqa: E402

TOKEN = "attach-python-token"


@pytest.fixture(scope="module")
def sample() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with gzip.open(SAMPLE, "rb") as f:
        sets = pickle.load(f, encoding="latin1")
    return {name: (np.asarray(x), np.asarray(y)) for name, (x, y) in zip(EXAMPLES, sets)}


def _wait_for(path, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


class UdsDaemon(Daemon):
    """A daemon also serving on a Unix socket: `.target` (unix://...), `.pid`."""

    def __init__(self, tmp_path, *args: str, name: str = "minibatchd.sock", env=None, grace: str = "1"):
        self.sock = tmp_path / name
        super().__init__("--uds", str(self.sock), "--shutdown-grace-secs", grace, *args, log_dir=tmp_path, env=env)
        _wait_for(self.sock)
        self.target = "unix://" + str(self.sock)
        self.pid = self.proc.pid


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = UdsDaemon(tmp_path_factory.mktemp("attach"), "--auth-token", TOKEN)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def uds(daemon):
    """A gRPC client over the daemon's Unix socket, with the token: it attaches too."""
    with mc.Client(daemon.target, token=TOKEN, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def tcp(daemon):
    with mc.Client(daemon.address, token=TOKEN, timeout=30) as c:
        yield c


def stable_fds(pid: int, quiet_s: float = 0.3, limit_s: float = 5.0) -> int:
    """pid's descriptor count once it has not changed for quiet_s."""
    deadline = time.monotonic() + limit_s
    n, since = open_fds(pid), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.02)
        m = open_fds(pid)
        if m != n:
            n, since = m, time.monotonic()
    return n


@pytest.fixture
def baseline(daemon, uds):
    """The daemon's descriptor count at rest, after everything it makes once
    (the uint8 mirror, a gRPC connection) exists; checked again at the end."""
    with uds.attach(x_dtype="uint8"):
        pass
    uds.get_batch("train", 0, 10)
    before = stable_fds(daemon.pid)
    yield before
    after = settle_fds(daemon.pid, before)
    assert after == before, (f"the daemon holds {after} descriptors, {before} before: "
                             f"{sorted(os.listdir(f'/proc/{daemon.pid}/fd'), key=int)}")
    x, y = uds.get_batch("test", 1, 100)  # and still serves
    assert x.shape == (100, 784)


# --- against the daemon: bytes, views, order ------------------------------------------

def test_attach_describes_the_dataset(uds):
    info = uds.info()
    with uds.attach() as a:
        assert a.fingerprint == info.fingerprint
        assert a.server_version == info.server_version
        assert isinstance(a.generation, int)
        assert list(a.sets) == list(info.sets)
        for name, s in a.sets.items():
            i = info.sets[name]
            assert s.examples == i.examples == EXAMPLES[name]
            assert (s.x.dtype, s.x.shape, s.x.sha256) == (i.x.dtype, (i.examples, *i.x.shape), i.x.sha256)
            assert (s.y.dtype, s.y.shape, s.y.sha256) == (i.y.dtype, (i.examples, *i.y.shape), i.y.sha256)
            assert s.stored_x is s.x
        assert a.verify() is True
        # The memory is the daemon's own memfd, mapped here.
        with open("/proc/self/maps") as f:
            assert "memfd:minibatchd" in f.read()
    assert a.closed


def test_batches_equal_the_sample_and_get_batch(uds, tcp, sample):
    with uds.attach() as a:
        for name, (sx, sy) in sample.items():
            n = len(sy)
            for size in (500, 7, 1000, n):
                nb = -(-n // size)
                for index in sorted({0, 1 % nb, nb // 2, nb - 1}):
                    x, y = a.batch(name, index, size)
                    lo, hi = index * size, min((index + 1) * size, n)
                    assert x.dtype == sx.dtype and y.dtype == sy.dtype
                    assert np.array_equal(x, sx[lo:hi]) and np.array_equal(y, sy[lo:hi]), (name, size, index)
                    if size in (500, 7):
                        gx, gy = tcp.get_batch(name, index, size)
                        assert x.tobytes() == gx.tobytes() and y.tobytes() == gy.tobytes()
            x, y = a.arrays(name)
            assert np.array_equal(x, sx) and np.array_equal(y, sy)


def test_minibatches_are_zero_copy_read_only_views(uds):
    with uds.attach() as a:
        x0, y0 = a.batch("train", 0, 500)
        x1, _ = a.batch("train", 1, 500)
        xa, ya = a.batch("train", 0, 3000)
        assert np.shares_memory(x0, xa) and np.shares_memory(x1, xa) and np.shares_memory(y0, ya)
        assert not np.shares_memory(x0, x1)
        # the view starts exactly 500 rows after batch 0: same buffer, no copy
        addr = lambda v: v.__array_interface__["data"][0]  # noqa: E731
        assert addr(x1) - addr(x0) == 500 * 784 * 4
        for v in (x0, y0, x1, xa):
            assert isinstance(_root(v), mmap.mmap), type(_root(v))
            assert not v.flags.writeable and not v.flags.owndata
            assert v.flags.c_contiguous
            with pytest.raises(ValueError, match="read-only"):
                v[0] = 1
            with pytest.raises(ValueError):
                v.setflags(write=True)
        with pytest.raises(TypeError):
            _root(x0)[0] = 1  # the mmap itself is read-only
        # a decoded or gathered minibatch is a fresh, writable array
        gx, gy = next(iter(a.epoch("train", 500)))
        assert gx.flags.writeable and gx.flags.aligned and not np.shares_memory(gx, xa)
        assert gy.flags.writeable and gy.flags.aligned and not np.shares_memory(gy, ya)
        a.close()
        # the views stay valid after close (they keep the mapping)
        assert x0.sum() == xa[:500].sum()
    del x0, y0, x1, xa, ya, gx, gy
    gc.collect()


def _root(a: np.ndarray):
    """The object at the end of an array's chain of bases (numpy holds a
    memoryview of the buffer it was made from: that view's object)."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


EPOCHS = [
    dict(),
    dict(shuffle=True, seed=7, epoch=2),
    dict(shuffle=True, seed=1, epoch=0, rank=1, world_size=3),
    dict(shuffle=True, seed=3, epoch=5, rank=2, world_size=4, drop_last=True),
    dict(rank=0, world_size=2, drop_last=True),
    dict(shuffle=True, seed=9, start=2, count=3),
    # Elastic resume (README "Order"): the order cut to [offset, n) before sharding.
    dict(shuffle=True, seed=5, epoch=1, rank=2, world_size=3, offset=1234),
    dict(shuffle=True, seed=6, epoch=4, rank=1, world_size=2, offset=777, drop_last=True, start=1),
    dict(offset=2950),
]


@pytest.mark.parametrize("size", [500, 64])
@pytest.mark.parametrize("kw", EPOCHS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_epoch_equals_stream_batches(uds, tcp, sample, kw, size):
    """Bit for bit what Client.epoch() receives, and the sample in the documented order."""
    sx, sy = sample["train"]
    order_kw = {k: v for k, v in kw.items() if k not in ("start", "count")}
    order = mc.epoch_order(len(sy), **{k: v for k, v in order_kw.items() if k != "drop_last"})
    with uds.attach() as a:
        got = list(a.epoch("train", size, **kw))
        want = list(tcp.epoch("train", size, **kw))
        assert len(got) == len(want) > 0
        start = kw.get("start", 0)
        for i, ((x, y), (gx, gy)) in enumerate(zip(got, want)):
            assert x.dtype == gx.dtype and y.dtype == gy.dtype and x.shape == gx.shape
            assert x.tobytes() == gx.tobytes() and y.tobytes() == gy.tobytes(), (kw, i)
            idx = order[(start + i) * size:(start + i + 1) * size]
            assert np.array_equal(x, sx[idx]) and np.array_equal(y, sy[idx])
            assert x.flags.writeable and x.flags.aligned and x.flags.c_contiguous
        assert len(got) == (a.num_batches("train", size, world_size=kw.get("world_size", 0),
                                          drop_last=kw.get("drop_last", False), offset=kw.get("offset", 0)) - start
                            if "count" not in kw else kw["count"])


@pytest.mark.parametrize("call,exc,words", [
    (("batch", "train", 6, 500), mc.OutOfRange, "past the end"),
    (("batch", "train", 0, 0), mc.InvalidArgument, "size must be at least 1"),
    (("batch", "nope", 0, 10), mc.NotFound, "nope"),
    (("epoch", "train", 10, dict(rank=2, world_size=2)), mc.InvalidArgument, "rank 2"),
    (("epoch", "test", 10, dict(world_size=1001)), mc.InvalidArgument, "world_size 1001"),
    (("epoch", "train", 500, dict(start=6)), mc.OutOfRange, "past the end"),
    (("epoch", "train", 10, dict(shuffle=True, offset=3001)), mc.InvalidArgument, "offset 3001 .*3000 examples"),
    (("epoch", "train", 10, dict(offset=3000, start=1)), mc.OutOfRange, "past the end"),
])
def test_bad_requests_fail_as_over_grpc(uds, tcp, call, exc, words):
    """The same exception class and key words as the gRPC client gets from the daemon."""
    kind, set_, a1, a2 = call[0], call[1], call[2], call[3]
    with uds.attach() as a:
        with pytest.raises(exc, match=words):
            if kind == "batch":
                a.batch(set_, a1, a2)
            else:
                list(a.epoch(set_, a1, **a2))
    with pytest.raises(exc, match=words):
        if kind == "batch":
            tcp.get_batch(set_, a1, a2)
        else:
            list(tcp.epoch(set_, a1, **a2))


def test_uint8_mirror(uds, tcp, sample):
    sx, _ = sample["train"]
    with uds.attach(x_dtype="uint8") as a:
        s = a.sets["train"]
        assert (s.x.dtype, s.stored_x.dtype, s.x.shape) == ("uint8", "float32", (3000, 784))
        assert s.x.scale_divisor == 256
        assert s.x.file != s.stored_x.file, "the mirror is a file of its own"
        x, y = a.batch("train", 2, 500)
        gx, gy = tcp.get_batch("train", 2, 500, x_dtype="uint8")
        assert x.dtype == gx.dtype == np.uint8 and not x.flags.writeable
        assert x.tobytes() == gx.tobytes() and y.tobytes() == gy.tobytes()
        assert np.array_equal(x.astype(np.float32) / np.float32(s.x.scale_divisor), sx[1000:1500])
        fx, _ = a.batch("train", 2, 500, decode=True)
        assert fx.dtype == np.float32 and np.array_equal(fx, sx[1000:1500])
        kw = dict(shuffle=True, seed=4, epoch=1, rank=1, world_size=2)
        for (ax, ay), (bx, by) in zip(a.epoch("valid", 128, **kw), tcp.epoch("valid", 128, x_dtype="uint8", **kw),
                                      strict=True):
            assert ax.tobytes() == bx.tobytes() and ay.tobytes() == by.tobytes()
        for (ax, _), (bx, _) in zip(a.epoch("test", 300, decode=True),
                                    tcp.epoch("test", 300, x_dtype="uint8", decode=True), strict=True):
            assert ax.dtype == np.float32 and ax.tobytes() == bx.tobytes()
        assert a.verify()


def test_uint8_refused_where_not_exact(tmp_path):
    """A set whose x is not exactly uint8 has no mirror: attaching with
    x_dtype="uint8" is an error naming it (as GetBatch's FAILED_PRECONDITION)."""
    rng = np.random.default_rng(1)
    sets = [(rng.random((40, 8), dtype=np.float32), rng.integers(0, 3, 40)) for _ in range(3)]
    data = tmp_path / "odd.pkl.gz"
    with gzip.open(data, "wb") as f:
        pickle.dump(sets, f)
    d = UdsDaemon(tmp_path, "--data", str(data))
    try:
        with mc.Client(d.target, timeout=30) as c:
            with pytest.raises(mc.FailedPrecondition, match="uint8"):
                c.get_batch("train", 0, 10, x_dtype="uint8")
            with pytest.raises(mc.FailedPrecondition, match="uint8"):
                c.attach(x_dtype="uint8")
            with c.attach() as a:
                assert np.array_equal(a.batch("train", 1, 10)[0], sets[0][0][10:20])
    finally:
        d.stop()


# --- seals, lifetimes ---------------------------------------------------------------------

def _punch_hole(fd: int, length: int) -> int:
    """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): errno, 0 if it worked."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    r = libc.fallocate(fd, 0x02 | 0x01, 0, length)
    return 0 if r == 0 else ctypes.get_errno()


def test_seals_hold(daemon, uds, sample):
    """A client holding the raw descriptors can read them but not change
    them: no writable shared mapping, no resize, no write, no hole punched."""
    s, body, fds = exchange(str(daemon.sock), pb.AttachRequest(token=TOKEN, client="seals test").SerializeToString())
    try:
        resp = pb.AttachResponse.FromString(body)
        assert resp.WhichOneof("result") == "attached", resp
        files = resp.attached.files
        assert len(fds) == len(files) >= 1
        for fd, f in zip(fds, files):
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW, hex(seals)
            assert seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE), hex(seals)
            assert os.fstat(fd).st_size >= f.bytes
            with pytest.raises(PermissionError):
                mmap.mmap(fd, f.bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, f.bytes + 4096)
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"\0", 0)
            assert _punch_hole(fd, f.bytes) in (errno.EPERM, errno.EACCES)
            # A private (copy-on-write) mapping may be written: the copy is this process's own.
            with mmap.mmap(fd, f.bytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[:8] = b"\xff" * 8
        # ... and nothing of it reached the daemon's memory.
        sx, sy = sample["train"]
        with uds.attach() as a:
            assert np.array_equal(a.batch("train", 0, 3000)[0], sx) and a.verify()
        assert np.array_equal(uds.get_batch("train", 0, 500)[0], sx[:500])
    finally:
        s.close()
        for fd in fds:
            os.close(fd)


def test_daemon_exit_keeps_the_data_and_a_restart_is_a_new_generation(tmp_path, sample):
    sx, sy = sample["train"]
    d1 = UdsDaemon(tmp_path)
    try:
        a1 = mc.attach.connect(d1.target)
        x1, y1 = a1.arrays("train")
        t = time.monotonic()
        d1.kill(signal.SIGTERM)  # exits with a trainer attached
        assert d1.proc.returncode == 0 and time.monotonic() - t < 5, d1.log.read_text()[-2000:]
        assert select.select([a1], [], [], 5)[0], "the attachment's socket sees the daemon go"
        assert np.array_equal(x1, sx) and np.array_equal(y1, sy) and a1.verify()
    finally:
        d1.stop()
    d2 = UdsDaemon(tmp_path)  # the same socket path
    try:
        a2 = mc.attach.connect(d2.target)
        assert a2.generation != a1.generation and a2.fingerprint == a1.fingerprint
        d2.kill(signal.SIGKILL)
        assert np.array_equal(a2.batch("train", 1, 500)[0], sx[500:1000]) and a2.verify()
        x2, _ = a2.batch("valid", 0, 1000)
        a1.close()
        a2.close()
        # after close too: the views keep their mappings
        assert np.array_equal(x1, sx) and np.array_equal(x2, sample["valid"][0])
        with pytest.raises(ValueError, match="closed"):
            a2.batch("train", 0, 10)
    finally:
        d2.stop()


# --- access ---------------------------------------------------------------------------------

def test_token_and_tcp(daemon, tcp):
    with mc.Client(daemon.target, timeout=30) as c:
        with pytest.raises(mc.Unauthenticated):
            c.attach()
    with mc.Client(daemon.target, token="wrong", timeout=30) as c:
        with pytest.raises(mc.Unauthenticated) as e:
            c.attach()
        assert isinstance(e.value, PermissionError)
    with pytest.raises(mc.FailedPrecondition, match="Unix socket"):
        tcp.attach()
    # The daemon answers the exchange on TCP too: FAILED_PRECONDITION, no descriptors.
    host, port = daemon.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(frame(pb.AttachRequest(token=TOKEN).SerializeToString()))
        data, fds = recv_reply(s)
    assert fds == []
    resp = pb.AttachResponse.FromString(data[16:])
    assert resp.WhichOneof("result") == "error" and resp.error.code == 9, resp
    assert "unix" in resp.error.message.lower(), resp.error.message


# --- abuse: the daemon keeps serving and leaks no descriptors ------------------------------

def _attach_ok(daemon) -> None:
    with mc.attach.connect(daemon.target, token=TOKEN, timeout=10) as a:
        assert a.batch("test", 0, 10)[1].shape == (10,)


def _answer(s: socket.socket) -> tuple[bytes, list[int]]:
    """What the daemon sends before closing or within 5 s: (bytes, descriptors)."""
    data, fds = b"", []
    try:
        data, fds = recv_reply(s, timeout=5)
    except (ConnectionResetError, socket.timeout):
        pass
    return data, fds


GARBAGE = {
    "bad version": frame(b"", version=2),
    "version 0": frame(b"", version=0),
    "huge length": frame(b"", length=0xFFFFFFFF),
    "just over 4096": frame(b"\0" * 10, length=4097),
    "not protobuf": frame(b"\xff\xff\xff\xff\xff\xff"),
    "wrong field types": frame(b"\x0d\x00\x00\x00\x00" + b"\x12\x02\x05\x05"),
    "truncated body": frame(b"\x0a\x05abc"[:4], length=40),
    "magic only": b"MBATTACH",
    "half the magic": b"MBAT",
}


@pytest.mark.parametrize("case", GARBAGE)
def test_garbage_after_the_magic(daemon, baseline, case):
    """An error reply or a close; no descriptors; the daemon still attaches others."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(daemon.sock))
        s.sendall(GARBAGE[case])
        s.shutdown(socket.SHUT_WR)
        data, fds = _answer(s)
    for fd in fds:
        os.close(fd)
    assert fds == [], f"{case}: descriptors passed for garbage"
    if data:
        resp = pb.AttachResponse.FromString(data[16:])
        assert resp.WhichOneof("result") == "error" and resp.error.code != 0, (case, resp)
    _attach_ok(daemon)


def test_garbage_held_open(daemon, baseline):
    """Partial requests left hanging do not stop others from attaching."""
    held = []
    try:
        for msg in (b"MBAT", frame(b"", length=100)[:20], frame(b"\x0a\x01x", length=3)[:16]):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(daemon.sock))
            s.sendall(msg)
            held.append(s)
        _attach_ok(daemon)
    finally:
        for s in held:
            s.close()


def test_descriptors_sent_to_the_daemon_are_not_kept(daemon, baseline):
    """A request carrying descriptors (SCM_RIGHTS) of its own: the daemon
    must not keep them."""
    junk = [os.open("/dev/null", os.O_RDONLY) for _ in range(8)]
    try:
        for _ in range(5):
            s, body, fds = exchange(str(daemon.sock), pb.AttachRequest(token=TOKEN).SerializeToString(),
                                    fds_to_send=tuple(junk))
            s.close()
            for fd in fds:
                os.close(fd)
    finally:
        for fd in junk:
            os.close(fd)


def test_requests_whose_reply_is_never_read(daemon, baseline):
    held = []
    try:
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(daemon.sock))
            s.sendall(frame(pb.AttachRequest(token=TOKEN, x_dtypes=[pb.DTYPE_UINT8]).SerializeToString()))
            held.append(s)
        time.sleep(0.3)
        _attach_ok(daemon)
    finally:
        for s in held:
            s.close()  # the descriptors still queued in them are closed by the kernel


def test_ten_thousand_attach_cycles(daemon, baseline):
    """Sequential attach + close with the client (the full exchange, checks
    and mappings): neither side keeps a descriptor."""
    cycles = 10_000
    mine = open_fds()
    t = time.monotonic()
    for i in range(cycles):
        a = mc.attach.connect(daemon.target, token=TOKEN, timeout=10)
        a.close()
        if i == 199 and time.monotonic() - t > 0.4:
            # The debug build is slower on a busy machine: keep the test under
            # ~20 s by scaling down (the rate is in the assertion message below).
            cycles = max(1000, int(200 * 15 / (time.monotonic() - t)))
        if i + 1 >= cycles:
            break
    took = time.monotonic() - t
    assert open_fds() == mine, "the client leaked descriptors"
    print(f"{cycles} attach cycles in {took:.1f} s ({cycles / took:.0f}/s)")


def test_max_attached(tmp_path):
    d = UdsDaemon(tmp_path, "--max-attached", "3")
    try:
        with mc.Client(d.target, timeout=30) as c:
            base = stable_fds(d.pid)
            held = [c.attach() for _ in range(3)]
            with pytest.raises(mc.ResourceExhausted, match="max-attached") as e:
                c.attach()
            assert e.value.code.name == "RESOURCE_EXHAUSTED"
            # gRPC on the same socket is not an attachment: it still serves.
            assert c.get_batch("train", 0, 10)[0].shape == (10, 784)
            held.pop().close()
            deadline = time.monotonic() + 2
            while True:  # the daemon sees the close when its socket reports it
                try:
                    held.append(c.attach())
                    break
                except mc.ResourceExhausted:
                    assert time.monotonic() < deadline, "a closed attachment still counts after 2 s"
                    time.sleep(0.01)
            with pytest.raises(mc.ResourceExhausted):
                c.attach()
            for a in held:
                a.close()
            again = [c.attach() for _ in range(3)]  # all three slots back
            for a in again:
                a.close()
        assert settle_fds(d.pid, base) == base
    finally:
        d.stop()


def test_unfinished_attach_requests_are_bounded_by_max_connections(tmp_path):
    """Connections that send the magic and then nothing (on the Unix socket
    or on TCP) are held by no attachment yet: like any connection still in
    its handshake they count against --max-connections, and newcomers evict
    the oldest, so they cannot pile up descriptors in the daemon for the
    whole handshake timeout."""
    d = UdsDaemon(tmp_path, "--max-connections", "8", "--handshake-timeout-secs", "30")
    held = []
    try:
        base = stable_fds(d.pid)
        host, port = d.address.rsplit(":", 1)
        for i in range(60):
            if i % 2:
                s = socket.create_connection((host, int(port)))
            else:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(d.sock))
            s.sendall(b"MBATTACH")
            held.append(s)
            time.sleep(0.01)  # each read by the daemon before the next arrives (not evicted while pending)
        time.sleep(0.5)
        n = stable_fds(d.pid)
        assert n <= base + 8 + 2, f"60 unfinished attach requests hold {n - base} descriptors of the daemon's"
        with mc.attach.connect(d.target, timeout=10) as a:  # a real client still gets in
            assert a.batch("test", 0, 1)[1].shape == (1,)
    finally:
        for s in held:
            s.close()
        d.stop()


# --- the client against a fake daemon: it takes no server's word -------------------------

def _tensor_lines(sets):
    return "".join(f"{n} {t} {a.dtype.name} {','.join(map(str, a.shape))} {hashlib.sha256(a.tobytes()).hexdigest()}\n"
                   for n, (x, y) in sets.items() for t, a in (("x", x), ("y", y)))


def fake_dataset():
    rng = np.random.default_rng(5)
    return {name: ((rng.integers(0, 256, (n, 4)) / 256).astype(np.float32), rng.integers(0, 10, n))
            for name, n in (("train", 10), ("valid", 3))}


def fake_reply(sets, *, mirror=False):
    """An honest AttachReply for `sets`, and the files' bytes: the stored
    tensors in file 0 (64-byte aligned), uint8 mirrors in file 1."""
    files = [bytearray(), bytearray()]
    regions = []

    def put(f, name, tensor, a, dtype, scale=0):
        while len(files[f]) % 64:
            files[f].append(0)
        regions.append(pb.Region(set=name, tensor=tensor, dtype=dtype, shape=list(a.shape), file=f,
                                 offset=len(files[f]), length=a.nbytes, sha256=hashlib.sha256(a.tobytes()).hexdigest(),
                                 scale_divisor=scale))
        files[f] += a.tobytes()

    for name, (x, y) in sets.items():
        put(0, name, "x", x, pb.DTYPE_FLOAT32)
        put(0, name, "y", y, pb.DTYPE_INT64)
        if mirror:
            put(1, name, "x", (x * 256).astype(np.uint8), pb.DTYPE_UINT8, 256)
    used = [bytes(f) for f in files if f]
    reply = pb.AttachReply(fingerprint=hashlib.sha256(_tensor_lines(sets).encode()).hexdigest(), generation=42,
                           server_version="fake", files=[pb.SharedFile(bytes=len(b)) for b in used], regions=regions)
    return reply, used


def _reply_bytes(reply: pb.AttachReply) -> bytes:
    return frame(pb.AttachResponse(attached=reply).SerializeToString())


def _files(data, seals=ALL_SEALS):
    return [memfd(b, seals=seals) for b in data]


@pytest.fixture
def fake(tmp_path):
    daemons = []

    def start(respond, hold=True):
        d = FakeDaemon(str(tmp_path / f"fake{len(daemons)}.sock"), respond, hold=hold)
        daemons.append(d)
        return "unix://" + d.path

    yield start
    for d in daemons:
        d.close()


def test_fake_daemon_honest(fake):
    sets = fake_dataset()
    reply, data = fake_reply(sets, mirror=True)
    target = fake(lambda req: (_reply_bytes(reply), _files(data)))
    with mc.Client(target, token="t0k").attach(x_dtype="uint8", name="honest") as a:
        assert (a.fingerprint, a.generation, a.server_version) == (reply.fingerprint, 42, "fake")
        x, y = a.batch("train", 1, 4)
        assert x.dtype == np.uint8 and np.array_equal(a.batch("train", 1, 4, decode=True)[0], sets["train"][0][4:8])
        assert np.array_equal(y, sets["train"][1][4:8])
        assert a.verify()
    # with F_SEAL_FUTURE_WRITE instead of F_SEAL_WRITE
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE
    reply, data = fake_reply(sets)
    target = fake(lambda req: (_reply_bytes(reply), _files(data, seals)))
    with mc.attach.connect(target) as a:
        assert np.array_equal(a.arrays("valid")[0], sets["valid"][0])


def test_the_request_on_the_wire(fake):
    """What the client sends: the framing and an AttachRequest."""
    seen = []

    def respond(req):
        seen.append(pb.AttachRequest.FromString(req))
        reply, data = fake_reply(fake_dataset(), mirror=bool(seen[-1].x_dtypes))
        return _reply_bytes(reply), _files(data)

    target = fake(respond)
    mc.Client(target, token="s3cret").attach(x_dtype="uint8").close()
    mc.attach.connect(target, name="n" * 500).close()
    assert seen[0].token == "s3cret" and list(seen[0].x_dtypes) == [pb.DTYPE_UINT8]
    assert seen[0].client == f"python {socket.gethostname()} pid {os.getpid()}"
    assert seen[1].token == "" and list(seen[1].x_dtypes) == [] and len(seen[1].client) == 128


def _mutate(reply, f):
    r = pb.AttachReply()
    r.CopyFrom(reply)
    f(r)
    return r


def _set_region(i, **kw):
    def f(r):
        for k, v in kw.items():
            if k == "shape":
                del r.regions[i].shape[:]
                r.regions[i].shape.extend(v)
            else:
                setattr(r.regions[i], k, v)
    return f


LIES = {
    # name: (reply mutation, seals, extra descriptor kind, x_dtype, words)
    "unsealed": (None, 0, None, None, r"files\[0\] is not sealed against F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE"),
    "writable": (None, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, None, None, "F_SEAL_WRITE or F_SEAL_FUTURE_WRITE"),
    "may grow": (None, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE, None, None, "F_SEAL_GROW"),
    "short file": (lambda r: setattr(r.files[0], "bytes", r.files[0].bytes + 4096), ALL_SEALS, None, None,
                   r"files\[0\].bytes is \d+ but the file has"),
    "extra descriptor": (None, ALL_SEALS, "extra", None, "1 files declared but 2 descriptors"),
    "missing descriptor": (lambda r: r.files.add(bytes=10), ALL_SEALS, None, None,
                           "2 files declared but 1 descriptors"),
    "not a memfd": (None, ALL_SEALS, "pipe", None, r"files\[0\] is not a regular file"),
    "outside the file": (_set_region(1, offset=1 << 40), ALL_SEALS, None, None,
                         r"regions\[1\] \(train/y\): offset 1099511627776 \+ length 80 lies outside files\[0\]"),
    "wrapping offset": (_set_region(1, offset=(1 << 64) - 8), ALL_SEALS, None, None, "lies outside"),
    "wrong length": (_set_region(0, length=156), ALL_SEALS, None, None,
                     r"regions\[0\] \(train/x\).length is 156, but shape \[10, 4\] of float32 is 160 bytes"),
    "unknown dtype": (_set_region(0, dtype=99), ALL_SEALS, None, None, r"regions\[0\] \(train/x\).dtype 99"),
    "tensor z": (_set_region(0, tensor="z"), ALL_SEALS, None, None, r"tensor is 'z'"),
    "no such file": (_set_region(0, file=3), ALL_SEALS, None, None, r"regions\[0\] \(train/x\).file is 3"),
    "empty shape": (_set_region(0, shape=[]), ALL_SEALS, None, None, "shape is empty"),
    "examples differ": (_set_region(1, shape=[9], length=72), ALL_SEALS, None, None,
                        "x has 10 examples but y has 9"),
    "y twice": (lambda r: r.regions.append(r.regions[1]), ALL_SEALS, None, None, "y as int64 twice"),
    "x twice": (lambda r: r.regions.append(_mutate(r, _set_region(0, dtype=pb.DTYPE_INT32, length=160)).regions[0]),
                ALL_SEALS, None, None, "has x as float32, int32"),
    "no y": (lambda r: r.regions.__delitem__(1), ALL_SEALS, None, None, "0 y regions"),
    "fingerprint": (lambda r: setattr(r, "fingerprint", "0" * 64), ALL_SEALS, None, None, "fingerprint 0000"),
    "sha not hex": (_set_region(0, sha256="Z" * 64), ALL_SEALS, None, None, "sha256 is not 64 lowercase hex"),
    "no mirror": (None, ALL_SEALS, None, "uint8", "set 'train' has no x as uint8"),
    "no regions": (lambda r: r.regions.__delitem__(slice(None)), ALL_SEALS, None, None, "no regions"),
}


@pytest.mark.parametrize("case", LIES)
def test_lying_daemons_are_refused(fake, case):
    mutate, seals, extra, x_dtype, words = LIES[case]
    reply, data = fake_reply(fake_dataset())
    if mutate:
        reply = _mutate(reply, mutate)

    def respond(req):
        fds = _files(data, seals)
        if extra == "extra":
            fds.append(memfd(b"x"))
        elif extra == "pipe":
            r, w = os.pipe()
            os.close(fds.pop(0))
            os.close(w)
            fds.insert(0, r)
        return _reply_bytes(reply), fds

    target = fake(respond)
    mine = open_fds()
    with pytest.raises(mc.ProtocolError, match=words):
        mc.attach.connect(target, x_dtype=x_dtype)
    assert settle_fds(os.getpid(), mine) == mine, "descriptors leaked"


BROKEN = {
    "too long": (struct.pack("<8sII", b"MBATTACH", 1, (1 << 20) + 1), "exceeds this client's limit"),
    "not the magic": (b"\x00\x00\x12\x04\x00\x00\x00\x00\x00" + b"\x00" * 16, "does not start with"),
    "version 2": (struct.pack("<8sII", b"MBATTACH", 2, 0), "protocol version 2"),
    "not protobuf": (frame(b"\xff\xff\xff"), "not a valid AttachResponse"),
    "empty oneof": (frame(b""), "neither"),
    "cut short": (frame(b"\x0a" * 20, length=100), "closed the connection 36 bytes into a 116-byte"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_replies(fake, case):
    msg, words = BROKEN[case]
    reply, data = fake_reply(fake_dataset())
    # descriptors along with it, to be closed; the fake closes at once (a cut-short reply ends there)
    target = fake(lambda req: (msg, _files(data)), hold=False)
    mine = open_fds()
    with pytest.raises(mc.ProtocolError, match=words):
        mc.attach.connect(target)
    assert settle_fds(os.getpid(), mine) == mine, "descriptors leaked"


def test_a_silent_daemon_times_out(tmp_path):
    path = str(tmp_path / "silent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    try:
        t = time.monotonic()
        with pytest.raises(mc.DeadlineExceeded):
            mc.attach.connect("unix://" + path, timeout=0.3)
        assert time.monotonic() - t < 2
    finally:
        srv.close()
    with pytest.raises(mc.Unavailable, match="cannot connect"):
        mc.attach.connect("unix://" + path)  # nobody listening now


@pytest.mark.parametrize("code,exc", [(16, mc.Unauthenticated), (8, mc.ResourceExhausted),
                                      (9, mc.FailedPrecondition), (3, mc.InvalidArgument), (14, mc.Unavailable),
                                      (7, mc.PermissionDenied), (13, mc.MinibatchError), (0, mc.ProtocolError),
                                      (99, mc.ProtocolError)])
def test_error_codes(fake, code, exc):
    body = pb.AttachResponse(error=pb.AttachError(code=code, message="the reason")).SerializeToString()
    target = fake(lambda req: (frame(body), []))
    with pytest.raises(exc, match="the reason") as e:
        mc.attach.connect(target)
    if exc is mc.MinibatchError:
        assert e.value.code.name == "INTERNAL"


def test_verify_finds_corrupt_bytes(fake):
    sets = fake_dataset()
    reply, data = fake_reply(sets)
    bad = bytearray(data[0])
    bad[reply.regions[2].offset] ^= 1  # valid/x's first byte
    target = fake(lambda req: (_reply_bytes(reply), _files([bytes(bad)])))
    with mc.attach.connect(target) as a:
        with pytest.raises(mc.ChecksumError, match=r"region valid/x \(float32 \[3, 4\]\) in file 0"):
            a.verify()


def test_close_unmaps_when_no_views_are_left(fake):
    reply, data = fake_reply(fake_dataset())
    target = fake(lambda req: (_reply_bytes(reply), _files(data)))

    def mapped() -> int:
        with open("/proc/self/maps") as f:
            return f.read().count("memfd:attach-test")

    before = mapped()
    a = mc.attach.connect(target)
    assert mapped() == before + 1
    a.close()
    assert mapped() == before, "closed with no views: unmapped at once"
    a = mc.attach.connect(target)
    x, y = a.batch("train", 0, 5)
    a.close()
    a.close()  # twice is fine
    assert mapped() == before + 1 and x.sum() >= 0  # a view keeps its mapping
    del x, y
    gc.collect()
    assert mapped() == before
    with pytest.raises(ValueError, match="closed"):
        a.batch("train", 0, 5)
    with pytest.raises(mc.FailedPrecondition, match="Unix socket"):
        mc.attach.connect("127.0.0.1:50051")
