"""The attach exchange by hand, for tests: the raw request and reply (to
hold the received descriptors themselves, or to send what no client would),
a fake daemon that answers with whatever a test scripts (sealed or unsealed
memfds, lying regions), and descriptor counting.

Written from the protocol comment in proto/minibatch/v1/minibatch.proto,
independently of minibatch_client/attach.py, so that the tests also check
the client against the protocol and not only against itself.
"""
from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import threading
import time
from typing import Callable, Optional

from paths import ROOT  # noqa: F401  (sys.path for the client is set by the test module)

MAGIC = b"MBATTACH"
F_SEAL_FUTURE_WRITE = 0x10
ALL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def frame(body: bytes, *, version: int = 1, length: Optional[int] = None) -> bytes:
    return MAGIC + struct.pack("<II", version, len(body) if length is None else length) + body


def recv_reply(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, list[int]]:
    """Everything the peer sends until it has sent one whole framed message
    (or closes): (bytes, descriptors received). b"" when it closed at once."""
    sock.settimeout(timeout)
    data = b""
    fds: list[int] = []
    need = 16
    while len(data) < need:
        chunk, anc, flags, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(253 * 4), socket.MSG_CMSG_CLOEXEC)
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cdata[: len(cdata) - len(cdata) % 4])
                fds.extend(a)
        assert not flags & socket.MSG_CTRUNC
        if not chunk:
            break
        data += chunk
        if len(data) >= 16 and need == 16:
            assert data[:8] == MAGIC, data[:32]
            need = 16 + struct.unpack("<I", data[12:16])[0]
    return data, fds


def exchange(path: str, body: bytes, *, fds_to_send: tuple[int, ...] = ()) -> tuple[socket.socket, bytes, list[int]]:
    """Connects, sends `body` framed, reads the reply: (the open socket, the
    reply's AttachResponse bytes, descriptors). The caller closes both."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    msg = frame(body)
    if fds_to_send:
        socket.send_fds(s, [msg], list(fds_to_send))
    else:
        s.sendall(msg)
    data, fds = recv_reply(s)
    return s, data[16:], fds


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle_fds(pid: int, want: int, limit_s: float = 5.0) -> int:
    """pid's open descriptor count once it is `want`, or what it is after limit_s."""
    deadline = time.monotonic() + limit_s
    while True:
        n = open_fds(pid)
        if n == want or time.monotonic() > deadline:
            return n
        time.sleep(0.02)


def memfd(data: bytes, *, seals: int = ALL_SEALS, size: Optional[int] = None) -> int:
    """A memfd holding `data` (file size `size`, default len(data)), with `seals` added."""
    fd = os.memfd_create("attach-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, len(data) if size is None else size)
    os.pwrite(fd, data, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


class FakeDaemon:
    """A Unix socket answering each attach request with `respond(request
    bytes) -> (reply bytes to send, descriptors to pass)` in one sendmsg
    (the descriptors are closed here after), then holding the connection
    until the client closes it. One connection at a time."""

    def __init__(self, path: str, respond: Callable[[bytes], tuple[bytes, list[int]]], *, hold: bool = True):
        self.path = path
        self.respond = respond
        self.hold = hold
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while len(head) < 16:
                    b = conn.recv(16 - len(head))
                    if not b:
                        break
                    head += b
                if len(head) < 16:
                    continue
                n = struct.unpack("<I", head[12:16])[0]
                body = b""
                while len(body) < n:
                    b = conn.recv(n - len(body))
                    if not b:
                        break
                    body += b
                self.requests.append(body)
                reply, fds = self.respond(body)
                try:
                    if fds:
                        socket.send_fds(conn, [reply], fds)
                    else:
                        conn.sendall(reply)
                except OSError:
                    continue
                finally:
                    for fd in fds:
                        os.close(fd)
                if not self.hold:
                    continue
                conn.settimeout(5)
                try:
                    conn.recv(1)  # until the client closes
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
