#!/usr/bin/env python3
"""Soak test: abusive clients against minibatchd under a memory cap, while a
well-behaved client keeps getting correct minibatches.

Usage (from the repository root, with the test venv):

    .venv/bin/python scripts/soak.py [--seconds 20] [--cap-mib 256] [--binary PATH] [--json OUT]

It starts the daemon (the bundled sample, loopback ports it picks, a 32 MiB
memory budget, --max-connections 64, the daemon's default budget wait
(10 s) and stall time (2 s), a request timeout of 2 s so that timeouts
happen within a short soak;
--handshake-timeout-secs too when the binary has that flag; see --help)
inside a memory cgroup capped at --cap-mib: cgroup v1
(/sys/fs/cgroup/memory/minibatchd-soak-PID, memory.limit_in_bytes and
memory.memsw.limit_in_bytes) or v2 (a child with memory.max). When neither
can be written, the daemon's VmRSS is only measured ("cap not enforced,
measured only"). It waits for `minibatchd health` to say SERVING, connects
the well-behaved client and the health prober first, then runs these
abusers for --seconds, each in its own process (so that their Python work
does not steal the GIL from the well-behaved client), each bounded in count
and time, each talking to 127.0.0.1 only and stopping by itself at the
deadline. They reproduce the memory audit's findings (tests/memory.rs has the
Rust regression tests of the same attacks):

1. tiny-chunks: GetBatch(train, size 3000, shuffled, max_chunk_bytes=1) in a
   loop over grpcio, every message read. The audit's finding 1: one message
   per byte, all queued at once (867 MiB for 1,000 examples). The server now
   floors chunks at 64 KiB; the figures show the smallest chunk seen.
2. never-read: hand-framed HTTP/2 on plain sockets with
   SETTINGS_INITIAL_WINDOW_SIZE=1, up to 60 GetBatch(size 3000, shuffled,
   distinct seeds, max_chunk_bytes 4 MiB) streams on 4 connections, never a
   WINDOW_UPDATE; closed streams are replaced. Finding 3: 4 connections x 64
   unread streams held 5.9 GB. Now every gathered byte is leased from one
   budget (--memory-budget-bytes), and a stream that cannot get budget waits
   (--budget-wait-secs), then ends RESOURCE_EXHAUSTED; while someone waits,
   connections whose chunks stay unsent past --budget-stall-secs are closed,
   and one connection's chunks hold at most half the budget. The socket is only
   drained (read, never acknowledged with window) once a second to see
   which streams ended.
3. partial-bodies: HTTP/2 streams whose gRPC message declares 60,000 bytes,
   sends 10 and stalls (finding 6: 2 connections x 64 streams x 4 MiB partial
   requests held 640 MB; now DEADLINE_EXCEEDED after
   --request-timeout-secs), and once a second one declaring 1 MiB (over the
   64 KiB request limit: OUT_OF_RANGE at once).
4. idle-sockets: up to 64 TCP connections to the gRPC port that never send a
   byte, reopened when closed: they press against --max-connections. Without
   a handshake deadline they hold their slots for as long as they like, and
   new clients are closed at accept; the well-behaved client and the health
   prober therefore connect before the abusers start and keep their
   connections, and a separate "fresh connection" probe (a new connection
   and a health check every second, what a new trainer or a kubelet probe
   does) reports how often a newcomer gets in.
5. churn: connect/close bursts, at most 200 connections a second (plain
   close, RST, and client preface then close, in turn).

Meanwhile the well-behaved client (minibatch_client.Client, main thread)
iterates shuffled epochs of train (size 500, a new seed each epoch, with
indices) and makes GetBatch calls (plain, and shuffled with indices), and
checks every minibatch against the bundled sample read independently with
pickle+gzip (x == sample_x[indices], y == sample_y[indices], the indices
equal to the documented order); a health prober checks
minibatch.v1.BatchService every 0.5 s (2 s deadline) on its own kept
connection; a monitor samples the daemon's RSS, the cgroup's usage and
/metrics.

Checks (exit status 1 if any fails; 2 if the soak could not run, 130 if
interrupted): every abuser ran; the good client verified > 0 minibatches
with 0 errors; every health probe answered SERVING; the daemon is alive at
the end and was not OOM-killed; its peak RSS stayed under the cap (and the
cgroup never reached its limit); minibatchd_budget_held_bytes never exceeded
the budget and returned to 0 within 5 s of the abusers stopping. The
fresh-connection admission rate is printed as information (a global
connection cap cannot keep out an attacker who holds every slot; see the
note it prints).

--abusers runs a subset, to find which abuser defeats the daemon (a
diagnostic, not a way to pass). Everything started is cleaned up
(processes, sockets, the cgroup) on any exit, including Ctrl-C and SIGTERM.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import multiprocessing as mp
import os
import pickle
import queue
import re
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import grpc
import numpy as np

REPO = Path(__file__).resolve().parent.parent
try:
    import minibatch_client
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO / "clients" / "python"))
    import minibatch_client
from minibatch_client import Client, epoch_order
from minibatch_client._proto import minibatch_pb2 as pb

#: every socket this script opens goes here, and nowhere else
LOOPBACK = "127.0.0.1"
SERVICE = "minibatch.v1.BatchService"
GET_BATCH = f"/{SERVICE}/GetBatch"
SAMPLE = REPO / "data" / "mnist-sample.pkl.gz"
MiB = 1 << 20
#: the well-behaved client's minibatch size
GOOD_SIZE = 500
#: how long after the abusers stop the budget must be whole again
BUDGET_RETURN_S = 5.0

CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


# --- HTTP/2 and HPACK, by hand -------------------------------------------------
#
# The attacks need what no stock client does on purpose (a 1-byte window and
# never a WINDOW_UPDATE, request bodies that stop halfway), so they frame
# HTTP/2 themselves. Requests use HPACK literals without indexing and without
# Huffman; responses (which the server Huffman-codes and indexes) are decoded
# to read grpc-status.

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x3, 0x4
H2_ERRORS = ["NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
             "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR",
             "CONNECT_ERROR", "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED"]

# RFC 7541 Appendix A.
HPACK_STATIC = [
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""),
    ("cache-control", ""), ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""),
    ("content-length", ""), ("content-location", ""), ("content-range", ""), ("content-type", ""),
    ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""),
    ("proxy-authenticate", ""), ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
    ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
    ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
]

# RFC 7541 Appendix B as code lengths in bits, two digits per symbol 0..256
# (256 = EOS). The code is canonical, so the codes follow from the lengths.
_HUFFMAN_LENGTHS = (
    "13232828282828282824302828302828282828282828302828282828282828280610101213060811101008110806060605"
    "05050606060606060607081506121013060707070707070707070707070707070707070707070708070813191314061505"
    "06050605060606050707060606050607060505060707070707151114132820222020222222232223232323232423242422"
    "23242323232321222322232324222120222223232123222224212223232121222123222323202222222322222326262019"
    "22232225262626272726242519212627272627242121262628272727202420212221212322222525242426232627262627"
    "272727272827272727272630"
)


def _huffman_decoding() -> dict[tuple[int, int], int]:
    lengths = [int(_HUFFMAN_LENGTHS[i:i + 2]) for i in range(0, len(_HUFFMAN_LENGTHS), 2)]
    assert len(lengths) == 257
    table, code, prev = {}, 0, 0
    for sym in sorted(range(257), key=lambda s: (lengths[s], s)):
        code <<= lengths[sym] - prev
        prev = lengths[sym]
        table[(prev, code)] = sym
        code += 1
    return table


_HUFFMAN = _huffman_decoding()


def huffman_decode(data: bytes) -> bytes:
    out, code, n = bytearray(), 0, 0
    for byte in data:
        for shift in range(7, -1, -1):
            code = (code << 1) | ((byte >> shift) & 1)
            n += 1
            sym = _HUFFMAN.get((n, code))
            if sym is not None:
                if sym == 256:
                    raise ValueError("EOS in a Huffman string")
                out.append(sym)
                code, n = 0, 0
    if n > 7 or code != (1 << n) - 1:
        raise ValueError("bad Huffman padding")
    return bytes(out)


def hpack_int(value: int, prefix: int, first: int = 0) -> bytes:
    """RFC 7541 5.1; `first` holds the bits above the prefix."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([first | value])
    out, value = bytearray([first | limit]), value - limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name: str, value: str) -> bytes:
    """A literal header field without indexing, new name, no Huffman."""
    n, v = name.encode(), value.encode()
    return b"\x00" + hpack_int(len(n), 7) + n + hpack_int(len(v), 7) + v


class HpackDecoder:
    """Just enough HPACK (RFC 7541) to read a response's headers: static and
    dynamic tables, Huffman strings."""

    def __init__(self):
        self.dynamic: list[tuple[str, str]] = []  # newest first
        self.size = 0
        self.max_size = 4096

    def _entry(self, index: int) -> tuple[str, str]:
        if 1 <= index <= len(HPACK_STATIC):
            return HPACK_STATIC[index - 1]
        return self.dynamic[index - len(HPACK_STATIC) - 1]

    def _evict(self):
        while self.size > self.max_size and self.dynamic:
            n, v = self.dynamic.pop()
            self.size -= 32 + len(n) + len(v)

    @staticmethod
    def _int(block: bytes, i: int, prefix: int) -> tuple[int, int]:
        limit = (1 << prefix) - 1
        value = block[i] & limit
        i += 1
        if value < limit:
            return value, i
        shift = 0
        while True:
            b = block[i]
            i += 1
            value += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value, i

    def _str(self, block: bytes, i: int) -> tuple[str, int]:
        huff = block[i] & 0x80
        n, i = self._int(block, i, 7)
        raw = block[i:i + n]
        return (huffman_decode(raw) if huff else raw).decode("latin-1"), i + n

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        out, i = [], 0
        while i < len(block):
            b = block[i]
            if b & 0x80:  # indexed
                index, i = self._int(block, i, 7)
                out.append(self._entry(index))
            elif b & 0x20 and not b & 0x40:  # dynamic table size update
                self.max_size, i = self._int(block, i, 5)
                self._evict()
            else:  # literal: with incremental indexing (01), without (0000) or never (0001)
                indexing = bool(b & 0x40)
                index, i = self._int(block, i, 6 if indexing else 4)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, i = self._str(block, i)
                value, i = self._str(block, i)
                out.append((name, value))
                if indexing:
                    self.dynamic.insert(0, (name, value))
                    self.size += 32 + len(name) + len(value)
                    self._evict()
        return out


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def grpc_message(body: bytes, declared: Optional[int] = None) -> bytes:
    """The gRPC length-prefixed message; `declared` lies about the length."""
    return b"\x00" + struct.pack(">I", len(body) if declared is None else declared) + body


def get_batch_request(size: int, seed: int, max_chunk_bytes: int) -> bytes:
    return pb.GetBatchRequest(set="train", index=0, size=size, order=pb.Order(shuffle=True, seed=seed),
                              max_chunk_bytes=max_chunk_bytes).SerializeToString()


class RawH2:
    """A hand-framed HTTP/2 client connection to LOOPBACK:port.

    `window` is SETTINGS_INITIAL_WINDOW_SIZE, the bytes the server may send
    on each stream before this client grants more: this client never grants
    more (it sends no WINDOW_UPDATE at all). `drain()` reads what arrived,
    without blocking, and returns the streams that ended since.
    """

    def __init__(self, port: int, *, window: int, answer_pings: bool, timeout: float = 2.0):
        self.authority = f"{LOOPBACK}:{port}"
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.answer_pings = answer_pings
        self.buf = bytearray()
        self.hpack = HpackDecoder()
        self.next_id = 1
        self.streams: dict[int, dict] = {}  # open streams: sid -> {kind, t0, data}
        self.ended: list[tuple[str, str, float, int]] = []  # (kind, outcome, seconds, data bytes)
        self.continuation: Optional[tuple[int, bool, bytearray]] = None
        self.closed = False
        self.goaway = False
        self.settings_seen = False
        self.max_streams: Optional[int] = None
        settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, window) + struct.pack(">HI", SETTINGS_ENABLE_PUSH, 0)
        self._send(PREFACE + h2_frame(SETTINGS, 0, 0, settings))

    def await_settings(self, timeout: float = 2.0) -> bool:
        """Reads until the server's SETTINGS arrived (and were acknowledged)."""
        end = time.monotonic() + timeout
        while not self.settings_seen and not self.closed and time.monotonic() < end:
            self.sock.settimeout(max(end - time.monotonic(), 0.01))
            try:
                got = self.sock.recv(65536)
            except socket.timeout:
                break
            except OSError:
                got = b""
            self._received(got)
        if not self.closed:
            self.sock.settimeout(2.0)
        return self.settings_seen and not self.closed

    def open_stream(self, path: str, body: bytes, *, end_stream: bool, kind: str) -> int:
        sid = self.next_id
        self.next_id += 2
        block = b"".join(hpack_literal(n, v) for n, v in (
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", self.authority),
            ("content-type", "application/grpc"), ("te", "trailers")))
        self.streams[sid] = {"kind": kind, "t0": time.monotonic(), "data": 0}
        self._send(h2_frame(HEADERS, END_HEADERS, sid, block)
                   + h2_frame(DATA, END_STREAM if end_stream else 0, sid, body))
        return sid

    def drain(self) -> list[tuple[str, str, float, int]]:
        """Reads what has arrived (waiting for nothing) and returns the
        streams that ended since the last drain. The only reading this
        connection does, apart from await_settings."""
        if self.closed:
            return self._take_ended()
        received = []
        self.sock.setblocking(False)
        while True:
            try:
                got = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                got = b""
            received.append(got)
            if not got:
                break
        self.sock.settimeout(2.0)  # our own frames (ACKs, new streams) are sent blocking
        for got in received:
            self._received(got)
        return self._take_ended()

    def _take_ended(self) -> list[tuple[str, str, float, int]]:
        ended, self.ended = self.ended, []
        return ended

    def wait_readable(self, timeout: float):
        """Waits (at most `timeout`) until something arrived."""
        if not self.closed:
            select.select([self.sock], [], [], max(timeout, 0.0))

    def close(self):
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def _send(self, data: bytes):
        try:
            self.sock.sendall(data)
        except OSError:
            self._lost("send-failed")

    def _lost(self, why: str):
        self.closed = True
        for sid in list(self.streams):
            self._end(sid, why)

    def _end(self, sid: int, outcome: str):
        s = self.streams.pop(sid, None)
        if s is not None:
            self.ended.append((s["kind"], outcome, time.monotonic() - s["t0"], s["data"]))

    def _received(self, got: bytes):
        if not got:
            self._lost("connection-closed")
            return
        self.buf += got
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[0:3], "big")
            if len(self.buf) < 9 + n:
                break
            kind, flags = self.buf[3], self.buf[4]
            sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(self.buf[9:9 + n])
            del self.buf[:9 + n]
            self._frame(kind, flags, sid, payload)

    def _frame(self, kind: int, flags: int, sid: int, p: bytes):
        if kind == HEADERS:
            pad = 0
            if flags & PADDED:
                pad, p = p[0], p[1:]
            if flags & PRIORITY:
                p = p[5:]
            if pad:
                p = p[:-pad]
            if flags & END_HEADERS:
                self._headers(sid, p, bool(flags & END_STREAM))
            else:
                self.continuation = (sid, bool(flags & END_STREAM), bytearray(p))
        elif kind == CONTINUATION and self.continuation is not None:
            csid, end, block = self.continuation
            block += p
            if flags & END_HEADERS:
                self.continuation = None
                self._headers(csid, bytes(block), end)
        elif kind == DATA:
            if sid in self.streams:
                self.streams[sid]["data"] += len(p)
                if flags & END_STREAM:
                    self._end(sid, "ended-without-trailers")
        elif kind == RST_STREAM:
            code = int.from_bytes(p[:4], "big")
            self._end(sid, "RST_STREAM " + (H2_ERRORS[code] if code < len(H2_ERRORS) else str(code)))
        elif kind == SETTINGS and not flags & ACK:
            for i in range(0, len(p) - 5, 6):
                ident, value = struct.unpack(">HI", p[i:i + 6])
                if ident == SETTINGS_MAX_CONCURRENT_STREAMS:
                    self.max_streams = value
            self.settings_seen = True
            self._send(h2_frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK and self.answer_pings:
            self._send(h2_frame(PING, ACK, 0, p))
        elif kind == GOAWAY:
            self.goaway = True
            last = int.from_bytes(p[:4], "big") & 0x7FFFFFFF
            for s in [s for s in self.streams if s > last]:
                self._end(s, "GOAWAY")

    def _headers(self, sid: int, block: bytes, end_stream: bool):
        try:
            headers = dict(self.hpack.decode(block))
        except (ValueError, IndexError) as e:  # our decoder's limits: say so, do not guess
            self._lost(f"undecodable-headers ({e})")
            return
        if not end_stream:
            return
        status = headers.get("grpc-status")
        if headers.get(":status", "200") != "200":
            outcome = "HTTP " + headers[":status"]
        elif status is None:
            outcome = "no-grpc-status"
        else:
            outcome = CODE_NAMES.get(int(status), status)
        self._end(sid, outcome)


# --- the abusers (each runs in its own process) --------------------------------

class Ctx:
    """What an abuser process knows: the port, its parameters, the deadline."""

    def __init__(self, port: int, params: dict, stop, deadline):
        self.port, self.params, self._stop, self._deadline = port, params, stop, deadline

    def over(self) -> bool:
        return self._stop.is_set() or time.time() >= self._deadline.value

    def remaining(self) -> float:
        return max(self._deadline.value - time.time(), 0.0)

    def sleep(self, seconds: float):
        self._stop.wait(min(seconds, self.remaining()))


class Tally:
    """An abuser's figures: attempts, outcomes, and a few numbers."""

    def __init__(self):
        self.attempts = 0
        self.outcomes: collections.Counter = collections.Counter()
        self.figures: dict = {}
        self.times: dict[str, list[float]] = collections.defaultdict(list)

    def most(self, key: str, value):
        self.figures[key] = max(self.figures.get(key, value), value)

    def least(self, key: str, value):
        self.figures[key] = min(self.figures.get(key, value), value)

    def to_dict(self) -> dict:
        times = {k: {"n": len(v), "p50_s": float(np.percentile(v, 50)), "max_s": float(max(v))}
                 for k, v in self.times.items() if v}
        return {"attempts": self.attempts, "outcomes": dict(self.outcomes), "figures": self.figures,
                "times": times}


def abuse_tiny_chunks(ctx: Ctx, t: Tally):
    """Finding 1: max_chunk_bytes=1 on a 3,000-example shuffled minibatch."""
    channel = grpc.insecure_channel(f"{LOOPBACK}:{ctx.port}", options=[("grpc.max_receive_message_length", -1)])
    call = channel.unary_stream(GET_BATCH, request_serializer=pb.GetBatchRequest.SerializeToString,
                                response_deserializer=None)
    seed = 0
    try:
        while not ctx.over() and t.attempts < ctx.params["max_calls"]:
            seed += 1
            t.attempts += 1
            req = pb.GetBatchRequest(set="train", size=3000, order=pb.Order(shuffle=True, seed=seed),
                                     max_chunk_bytes=1)
            messages = 0
            t0 = time.monotonic()
            try:
                for raw in call(req, timeout=max(ctx.remaining(), 0.5)):
                    messages += 1
                    m = pb.TensorChunk.FromString(raw)
                    if m.offset + len(m.data) < m.total_bytes:  # not a tensor's last chunk
                        t.least("smallest_chunk_bytes", len(m.data))
                t.outcomes["OK"] += 1
                t.least("messages_per_call_min", messages)
                t.most("messages_per_call_max", messages)
                t.times["call"].append(time.monotonic() - t0)
            except grpc.RpcError as e:
                cut = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and ctx.remaining() < 0.1
                t.outcomes["cut by the soak's deadline" if cut else e.code().name] += 1
                ctx.sleep(0.05)
    finally:
        channel.close()


def abuse_never_read(ctx: Ctx, t: Tally):
    """Finding 3: streams whose 1-byte window is never opened, on a few connections."""
    p = ctx.params
    per_conn = max(p["streams"] // p["connections"], 1)
    conns: list[Optional[RawH2]] = [None] * p["connections"]
    next_try = [0.0] * p["connections"]
    seed = 10_000
    t.figures["connections_opened"] = t.figures["connection_failures"] = t.figures["connections_lost"] = 0
    try:
        while not ctx.over():
            for i in range(len(conns)):
                c = conns[i]
                if c is not None and (c.closed or c.goaway):
                    for kind, outcome, secs, _ in c.drain():
                        t.outcomes[outcome] += 1
                    c.close()
                    conns[i] = c = None
                    t.figures["connections_lost"] += 1
                if c is None:
                    if time.monotonic() < next_try[i]:
                        continue
                    next_try[i] = time.monotonic() + 0.25  # reconnects: at most 4 a second per slot
                    try:
                        c = RawH2(ctx.port, window=1, answer_pings=False)
                        if not c.await_settings():
                            raise ConnectionError("no SETTINGS from the server")
                    except OSError:
                        t.figures["connection_failures"] += 1
                        if c is not None:
                            c.close()
                        continue
                    conns[i] = c
                    t.figures["connections_opened"] += 1
                    if c.max_streams:
                        t.figures["server_max_concurrent_streams"] = c.max_streams
                while len(c.streams) < per_conn and not c.closed and t.attempts < p["max_streams"]:
                    seed += 1
                    t.attempts += 1
                    body = grpc_message(get_batch_request(3000, seed, 4 * MiB))
                    c.open_stream(GET_BATCH, body, end_stream=True, kind="get-batch")
            t.most("open_streams_max", sum(len(c.streams) for c in conns if c))
            t.figures["ends_seen_at_drains_every_s"] = p["drain_every_s"]
            ctx.sleep(p["drain_every_s"])
            for c in conns:
                if c is None:
                    continue
                for kind, outcome, secs, _ in c.drain():
                    t.outcomes[outcome] += 1
                    t.times[outcome].append(secs)
        # At the deadline: what is still held, then leave (closing frees it all).
        held = [s for c in conns if c for s in c.streams.values()]
        t.outcomes["still open at the deadline"] += len(held)
        t.figures["open_at_deadline_with_data"] = sum(1 for s in held if s["data"] > 0)
    finally:
        for c in conns:
            if c is not None:
                c.close()


def abuse_partial_bodies(ctx: Ctx, t: Tally):
    """Finding 6: request messages that never finish, and one too large to take."""
    p = ctx.params
    c: Optional[RawH2] = None
    next_oversized = 0.0
    t.figures["connections_opened"] = t.figures["connection_failures"] = 0
    try:
        while not ctx.over():
            if c is None or c.closed or c.goaway:
                if c is not None:
                    for kind, outcome, secs, _ in c.drain():
                        t.outcomes[f"{kind}: {outcome}"] += 1
                    c.close()
                    c = None
                try:
                    c = RawH2(ctx.port, window=65535, answer_pings=True)
                    if not c.await_settings():
                        raise ConnectionError("no SETTINGS from the server")
                    t.figures["connections_opened"] += 1
                except OSError:
                    t.figures["connection_failures"] += 1
                    if c is not None:
                        c.close()
                    c = None
                    ctx.sleep(0.25)
                    continue
            started = time.monotonic()
            partial = sum(1 for s in c.streams.values() if s["kind"] == "partial-60000")
            while partial < p["streams"] and t.attempts < p["max_streams"]:
                t.attempts += 1
                partial += 1
                # 10 bytes of a message that declares 60,000: a valid start, then nothing.
                c.open_stream(GET_BATCH, grpc_message(b"\x0a\x05train" + b"\x00" * 3, declared=60_000),
                              end_stream=False, kind="partial-60000")
            if started >= next_oversized:
                next_oversized = started + 1.0
                t.attempts += 1
                c.open_stream(GET_BATCH, grpc_message(b"", declared=1 << 20), end_stream=False, kind="declares-1MiB")
            # Read answers as they come (so the times are the server's), for
            # the rest of this round: at most 10 rounds a second.
            while not c.closed and not ctx.over() and time.monotonic() - started < 0.1:
                c.wait_readable(min(0.1 - (time.monotonic() - started), ctx.remaining()))
                for kind, outcome, secs, _ in c.drain():
                    t.outcomes[f"{kind}: {outcome}"] += 1
                    t.times[f"{kind}: {outcome}"].append(secs)
        if c is not None:
            for s in c.streams.values():
                t.outcomes[f"{s['kind']}: still open at the deadline"] += 1
    finally:
        if c is not None:
            c.close()


def abuse_idle_sockets(ctx: Ctx, t: Tally):
    """TCP connections that never send a byte: they press --max-connections."""
    p = ctx.params
    sel = selectors.DefaultSelector()
    socks: dict[socket.socket, dict] = {}
    budget_t, budget_n = time.monotonic(), 0  # reconnect rate limit
    try:
        while not ctx.over():
            now = time.monotonic()
            if now - budget_t >= 1.0:
                budget_t, budget_n = now, 0
            while len(socks) < p["sockets"] and budget_n < p["connects_per_s"] and t.attempts < p["max_connects"]:
                budget_n += 1
                t.attempts += 1
                try:
                    s = socket.create_connection((LOOPBACK, ctx.port), timeout=1.0)
                except OSError as e:
                    t.outcomes[f"connect failed ({type(e).__name__})"] += 1
                    break
                s.setblocking(False)
                socks[s] = {"t0": time.monotonic(), "bytes": 0}
                sel.register(s, selectors.EVENT_READ)
            t.most("open_max", len(socks))
            for key, _ in sel.select(timeout=min(0.1, max(ctx.remaining(), 0.01))):
                s = key.fileobj
                try:
                    got = s.recv(65536)  # the server's SETTINGS, if it sends them: read and ignored
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    got = b""
                if got:
                    socks[s]["bytes"] += len(got)
                    continue
                info = socks.pop(s)
                sel.unregister(s)
                s.close()
                lived = time.monotonic() - info["t0"]
                if info["bytes"] == 0 and lived < 0.5:
                    t.outcomes["closed at once, no byte (refused at the limit)"] += 1
                else:
                    t.outcomes["closed by the server later"] += 1
                    t.times["lifetime of those closed later"].append(lived)
        t.outcomes["still open at the deadline"] += len(socks)
        if socks:
            t.figures["oldest_open_at_deadline_s"] = round(max(time.monotonic() - i["t0"] for i in socks.values()), 1)
    finally:
        for s in socks:
            s.close()
        sel.close()


def abuse_churn(ctx: Ctx, t: Tally):
    """Connect/close bursts: plain close, RST (SO_LINGER 0), preface then close."""
    p = ctx.params
    burst = max(p["per_s"] // 10, 1)
    modes = ("close", "rst", "preface+close")
    while not ctx.over() and t.attempts < p["max_connects"]:
        start = time.monotonic()
        for _ in range(burst):
            mode = modes[t.attempts % len(modes)]
            t.attempts += 1
            try:
                s = socket.create_connection((LOOPBACK, ctx.port), timeout=1.0)
            except OSError as e:
                t.outcomes[f"connect failed ({type(e).__name__})"] += 1
                continue
            try:
                if mode == "rst":
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif mode == "preface+close":
                    s.sendall(PREFACE + h2_frame(SETTINGS, 0, 0))
                t.outcomes[f"connected, {mode}"] += 1
            except OSError as e:
                t.outcomes[f"{mode} failed ({type(e).__name__})"] += 1
            finally:
                s.close()
        ctx.sleep(0.1 - (time.monotonic() - start))


ABUSERS: dict[str, Callable[[Ctx, Tally], None]] = {
    "tiny-chunks": abuse_tiny_chunks,
    "never-read": abuse_never_read,
    "partial-bodies": abuse_partial_bodies,
    "idle-sockets": abuse_idle_sockets,
    "churn": abuse_churn,
}


def _abuser_process(name: str, port: int, params: dict, go, stop, deadline, results):
    """Entry point of an abuser's process: waits for `go`, runs to the deadline,
    reports its Tally (also when it crashed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it (stop event, then terminate)
    t = Tally()
    try:
        results.put(("ready", name, None))
        go.wait()
        ctx = Ctx(port, params, stop, deadline)
        ctx.sleep(params.get("delay_s", 0.0))
        ABUSERS[name](ctx, t)
    except BaseException:
        t.figures["crashed"] = traceback.format_exc(limit=4)
    finally:
        results.put(("done", name, t.to_dict()))


# --- the daemon under a memory cap -------------------------------------------------

class MemoryCap:
    """A memory cgroup of `cap` bytes for the daemon (v1 or v2), or nothing
    when neither can be written (then the daemon's RSS is only measured)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.path: Optional[Path] = None
        self.kind = "none"
        self.note = ""
        name = f"minibatchd-soak-{os.getpid()}"
        v2_root = Path("/sys/fs/cgroup")
        try:
            if (v2_root / "cgroup.controllers").exists():
                self._v2(v2_root, name)
            elif (Path("/sys/fs/cgroup/memory") / "memory.limit_in_bytes").exists():
                self._v1(Path("/sys/fs/cgroup/memory"), name)
            else:
                self.note = "no memory cgroup found"
        except OSError as e:
            self.note = f"cannot use a memory cgroup ({e})"
            self.remove()
            self.kind = "none"

    def _v1(self, root: Path, name: str):
        self.path = root / name
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(self.cap))
        if (self.path / "memory.memsw.limit_in_bytes").exists():  # no swapping out of the cap either
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(self.cap))
        self.kind = "v1"

    def _v2(self, root: Path, name: str):
        if "memory" not in (root / "cgroup.subtree_control").read_text().split():
            (root / "cgroup.subtree_control").write_text("+memory")
        self.path = root / name
        self.path.mkdir()
        (self.path / "memory.max").write_text(str(self.cap))
        if (self.path / "memory.swap.max").exists():
            (self.path / "memory.swap.max").write_text("0")
        self.kind = "v2"

    @property
    def enforced(self) -> bool:
        return self.kind != "none"

    def describe(self) -> str:
        if not self.enforced:
            return f"cap not enforced, measured only ({self.note})"
        return f"cgroup {self.kind} {self.path}"

    def join(self):
        """preexec_fn of the daemon: moves the child itself in before exec."""
        if self.enforced:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def _read(self, f: str) -> str:
        try:
            return (self.path / f).read_text()
        except (OSError, TypeError):
            return ""

    def usage(self) -> Optional[int]:
        v = self._read("memory.usage_in_bytes" if self.kind == "v1" else "memory.current").strip()
        return int(v) if v.isdigit() else None

    def figures(self) -> dict:
        if not self.enforced:
            return {}

        def num(f: str) -> Optional[int]:
            v = self._read(f).strip()
            return int(v) if v.isdigit() else None

        def fields(f: str) -> dict:
            return {k: int(v) for k, v in (ln.split() for ln in self._read(f).splitlines() if len(ln.split()) == 2)
                    if v.isdigit()}

        if self.kind == "v1":
            stat = fields("memory.stat")
            return {"max_usage_bytes": num("memory.max_usage_in_bytes"), "failcnt": num("memory.failcnt"),
                    "memsw_max_usage_bytes": num("memory.memsw.max_usage_in_bytes"),
                    "oom_kill": fields("memory.oom_control").get("oom_kill"),
                    "rss_bytes": stat.get("rss"), "cache_bytes": stat.get("cache")}
        events = fields("memory.events")
        return {"max_usage_bytes": num("memory.peak"), "failcnt": events.get("max"),
                "oom_kill": events.get("oom_kill")}

    def remove(self):
        if self.path is None:
            return
        for _ in range(50):  # the cgroup is removable once its last task is gone
            try:
                self.path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        else:
            print(f"warning: could not remove {self.path}", file=sys.stderr)
        self.path = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def pick_binary(given: Optional[str]) -> Path:
    if given:
        return Path(given).resolve()
    debug, release = REPO / "target/debug/minibatchd", REPO / "target/release/minibatchd"
    if release.exists() and (not debug.exists() or release.stat().st_mtime >= debug.stat().st_mtime):
        return release
    if debug.exists():
        return debug
    sys.exit("no minibatchd binary under target/ (cargo build first, or --binary PATH)")


def rss_of(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def scrape(metrics_addr: str, timeout: float = 1.0) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=timeout) as r:
        page = r.read().decode()
    out = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


class Monitor(threading.Thread):
    """Samples the daemon's RSS and cgroup usage (10/s) and /metrics (4/s)."""

    def __init__(self, pid: int, cap: MemoryCap, metrics_addr: str):
        super().__init__(name="monitor", daemon=True)
        self.pid, self.cap, self.metrics_addr = pid, cap, metrics_addr
        self.stop = threading.Event()
        self.rss_max = 0
        self.cgroup_usage_max = 0
        self.held_max = 0
        self.active_streams_max = 0
        self.scrape_errors = 0
        self.last: dict[str, float] = {}

    def run(self):
        n = 0
        while not self.stop.wait(0.1):
            self.rss_max = max(self.rss_max, rss_of(self.pid).get("VmRSS", 0))
            self.cgroup_usage_max = max(self.cgroup_usage_max, self.cap.usage() or 0)
            n += 1
            if n % 2 == 0:
                self.sample_metrics()

    def sample_metrics(self) -> dict[str, float]:
        try:
            m = scrape(self.metrics_addr)
        except OSError:
            self.scrape_errors += 1
            return {}
        self.last = m
        self.held_max = max(self.held_max, int(m.get("minibatchd_budget_held_bytes", 0)))
        self.active_streams_max = max(self.active_streams_max, int(m.get("minibatchd_active_streams", 0)))
        return m


class HealthProber(threading.Thread):
    """grpc.health.v1 Check of the BatchService every 0.5 s (2 s deadline) on
    a connection kept from before the abusers started; and, every second, one
    on a fresh connection (what a new client or a kubelet probe meets)."""

    REQUEST = b"\x0a" + bytes([len(SERVICE)]) + SERVICE.encode()

    def __init__(self, address: str):
        super().__init__(name="health", daemon=True)
        self.address = address
        self.stop = threading.Event()
        self.channel = self._channel()
        self.check = self.channel.unary_unary("/grpc.health.v1.Health/Check")
        self.ok = self.total = 0
        self.failures: collections.Counter = collections.Counter()
        self.fresh_ok = self.fresh_total = 0
        self.fresh_failures: collections.Counter = collections.Counter()

    def _channel(self) -> grpc.Channel:
        # A subchannel of its own: not shared with the good client's channel.
        return grpc.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])

    def probe(self, check=None) -> Optional[str]:
        """None when SERVING, else what went wrong."""
        try:
            resp = (check or self.check)(self.REQUEST, timeout=2.0)
            return None if resp == b"\x08\x01" else f"status bytes {resp!r}"
        except grpc.RpcError as e:
            return e.code().name

    def run(self):
        last_fresh = 0.0
        while not self.stop.wait(0.5):
            why = self.probe()
            self.total += 1
            if why is None:
                self.ok += 1
            else:
                self.failures[why] += 1
            if time.monotonic() - last_fresh >= 1.0 and not self.stop.is_set():
                last_fresh = time.monotonic()
                ch = self._channel()
                try:
                    why = self.probe(ch.unary_unary("/grpc.health.v1.Health/Check"))
                finally:
                    ch.close()
                self.fresh_total += 1
                if why is None:
                    self.fresh_ok += 1
                else:
                    self.fresh_failures[why] += 1

    def close(self):
        self.channel.close()


# --- the well-behaved client ---------------------------------------------------------

def load_sample() -> tuple[np.ndarray, np.ndarray]:
    """train (x, y) of the bundled sample, read by Python's own pickle."""
    with gzip.open(SAMPLE, "rb") as f:
        (x, y), _, _ = pickle.load(f, encoding="latin1")
    assert x.dtype == np.float32 and x.shape[1:] == (784,) and y.dtype == np.int64
    return x, y


class GoodClient:
    """Shuffled epochs and GetBatch calls, every minibatch checked."""

    def __init__(self, client: Client, sample: tuple[np.ndarray, np.ndarray]):
        self.client = client
        self.x, self.y = sample
        self.n = len(self.y)
        self.verified = 0
        self.latencies: list[float] = []
        self.errors: collections.Counter = collections.Counter()
        self.first_errors: list[str] = []
        self.t0 = time.monotonic()
        #: seconds since t0 of each error, and the number of minibatches verified by then
        self.error_times: list[float] = []

    def _verify(self, what: str, x, y, idx, want_idx: np.ndarray):
        if idx is not None and not np.array_equal(idx, want_idx):
            raise AssertionError(f"{what}: indices differ from the documented order")
        if x.dtype != np.float32 or x.shape != (len(want_idx), 784) or y.dtype != np.int64 or y.shape != want_idx.shape:
            raise AssertionError(f"{what}: got x {x.dtype}{x.shape}, y {y.dtype}{y.shape}")
        if not np.array_equal(x, self.x[want_idx]) or not np.array_equal(y, self.y[want_idx]):
            raise AssertionError(f"{what}: bytes differ from the sample")
        self.verified += 1

    def _error(self, what: str, e: BaseException):
        code = getattr(e, "code", None)
        key = f"{type(e).__name__}" + (f" {code.name}" if isinstance(code, grpc.StatusCode) else "")
        self.errors[key] += 1
        self.error_times.append(time.monotonic() - self.t0)
        if len(self.first_errors) < 5:
            self.first_errors.append(f"{what}: {key}: {str(e)[:300]}")

    def run_round(self, k: int, deadline: float, count: bool = True):
        """One shuffled epoch (seed and epoch k) and a few GetBatch calls."""
        seed, nb = 1000 + k, -(-self.n // GOOD_SIZE)
        order = epoch_order(self.n, shuffle=True, seed=seed, epoch=k)
        what = f"epoch {k}"
        try:
            t0 = time.monotonic()
            with self.client.epoch("train", GOOD_SIZE, shuffle=True, seed=seed, epoch=k, with_indices=True) as it:
                for i, (x, y, idx) in enumerate(it):
                    self.latencies.append(time.monotonic() - t0)
                    what = f"epoch {k} minibatch {i}"
                    self._verify(what, x, y, idx, order[i * GOOD_SIZE:(i + 1) * GOOD_SIZE])
                    if time.monotonic() >= deadline:
                        break
                    t0 = time.monotonic()
                else:
                    if it.position != nb:
                        raise AssertionError(f"epoch {k}: {it.position} minibatches, want {nb}")
        except Exception as e:  # noqa: BLE001 - every failure counts
            self._error(what, e)
        for i in range(nb):
            if time.monotonic() >= deadline:
                return
            shuffled = i % 2 == 1
            what = f"GetBatch {i} {'shuffled' if shuffled else 'plain'} (round {k})"
            try:
                t0 = time.monotonic()
                if shuffled:
                    x, y, idx = self.client.get_batch("train", i, GOOD_SIZE, shuffle=True, seed=seed, epoch=k,
                                                      with_indices=True)
                else:
                    (x, y), idx = self.client.get_batch("train", i, GOOD_SIZE), None
                self.latencies.append(time.monotonic() - t0)
                want = order[i * GOOD_SIZE:(i + 1) * GOOD_SIZE] if shuffled else np.arange(
                    i * GOOD_SIZE, min((i + 1) * GOOD_SIZE, self.n))
                self._verify(what, x, y, idx, want)
            except Exception as e:  # noqa: BLE001
                self._error(what, e)
                time.sleep(0.05)  # no hot loop against a refusing server


# --- the run ---------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


def serve_flags(binary: Path) -> str:
    return subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True, timeout=60).stdout


def wait_serving(binary: Path, addr: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode} before serving:\n{log.read_text()[-3000:]}")
        r = subprocess.run([str(binary), "health", "--server", addr], capture_output=True, timeout=30)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the daemon was not SERVING after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def percentile_ms(v: list[float], q: float) -> Optional[float]:
    return round(float(np.percentile(v, q)) * 1e3, 2) if v else None


def run(args) -> dict:
    binary = pick_binary(args.binary)
    help_text = serve_flags(binary)
    has_handshake = "--handshake-timeout-secs" in help_text
    sample = load_sample()
    port, mport = free_port(), free_port()
    addr, maddr = f"{LOOPBACK}:{port}", f"{LOOPBACK}:{mport}"
    budget = args.budget_mib * MiB
    cmd = [str(binary), "serve", "--addr", addr, "--metrics-addr", maddr,
           "--memory-budget-bytes", str(budget), "--budget-wait-secs", str(args.budget_wait_secs),
           "--request-timeout-secs", str(args.request_timeout_secs),
           "--max-connections", str(args.max_connections), "--shutdown-grace-secs", "5"]
    if has_handshake:
        cmd += ["--handshake-timeout-secs", str(args.handshake_timeout_secs)]
    built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(binary.stat().st_mtime))
    report: dict = {"binary": str(binary), "binary_built": built, "command": cmd, "seconds": args.seconds, "abusers_run": args.abusers, "cap_bytes": args.cap_mib * MiB,
                    "budget_bytes": budget, "handshake_flag": has_handshake, "checks": []}

    cap = MemoryCap(args.cap_mib * MiB)
    report["cap"] = cap.describe()
    tmp = tempfile.TemporaryDirectory(prefix="minibatchd-soak-")
    log = Path(tmp.name) / "daemon.log"
    daemon: Optional[subprocess.Popen] = None
    procs: list[mp.Process] = []
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    monitor = prober = client = None
    try:
        with open(log, "wb") as logf:
            daemon = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                      start_new_session=True, preexec_fn=cap.join)
        wait_serving(binary, addr, daemon, log)
        monitor = Monitor(daemon.pid, cap, maddr)
        monitor.start()

        # The well-behaved side connects first and keeps its connections.
        native = {"auto": None, "native": True, "grpcio": False}[args.transport]
        client = Client(addr, timeout=15.0, stream_timeout=60.0, native=native)
        good = GoodClient(client, sample)
        good.run_round(10_000, time.monotonic() + 30)  # warm-up round (its own seed), not counted
        if good.errors:
            raise RuntimeError(f"the well-behaved client failed before any abuse: {good.first_errors}")
        prober = HealthProber(addr)
        if prober.probe() is not None:
            raise RuntimeError("the health prober failed before any abuse")
        report["transport"] = client.transport

        # The abusers: started, ready, then all let go at once.
        go, deadline, results = ctx.Event(), ctx.Value("d", 0.0), ctx.Queue()
        s = args.seconds
        params = {
            "tiny-chunks": {"max_calls": 50 * s},
            "never-read": {"streams": 60, "connections": 4, "drain_every_s": 0.25, "max_streams": 500 * s},
            "partial-bodies": {"streams": 16, "max_streams": 200 * s},
            # After the others connected: idle sockets then take every slot left.
            "idle-sockets": {"sockets": 64, "connects_per_s": 100, "max_connects": 100 * s, "delay_s": 1.0},
            "churn": {"per_s": 200, "max_connects": 200 * s, "delay_s": 1.0},
        }
        for name in args.abusers:
            p = ctx.Process(target=_abuser_process, name=f"soak-{name}", daemon=True,
                            args=(name, port, params[name], go, stop, deadline, results))
            p.start()
            procs.append(p)
        ready = set()
        end = time.monotonic() + 60
        while len(ready) < len(procs) and time.monotonic() < end:
            try:
                kind, name, _ = results.get(timeout=1.0)
                ready.add(name)
            except queue.Empty:
                if any(not p.is_alive() for p in procs):
                    raise RuntimeError("an abuser process died before starting")
        if len(ready) < len(procs):
            raise RuntimeError("abuser processes did not start within 60 s")

        deadline.value = time.time() + s
        t_end = time.monotonic() + s
        good = GoodClient(client, sample)  # its clock starts with the abusers
        go.set()
        prober.start()
        k = 0
        while time.monotonic() < t_end:
            good.run_round(k, t_end)
            k += 1

        # The abusers stop by themselves at the deadline; collect their figures.
        abusers = {}
        end = time.monotonic() + 30
        while len(abusers) < len(procs) and time.monotonic() < end:
            try:
                kind, name, tally = results.get(timeout=1.0)
            except queue.Empty:
                continue
            if kind == "done":
                abusers[name] = tally
        for p in procs:
            p.join(timeout=5)
        abusers_done = time.monotonic()
        prober.stop.set()
        prober.join(timeout=5)

        # The budget must be whole again soon after the abusers left.
        back_after = None
        while time.monotonic() - abusers_done < BUDGET_RETURN_S:
            m = monitor.sample_metrics()
            if m and m.get("minibatchd_budget_held_bytes", -1) == 0:
                back_after = time.monotonic() - abusers_done
                break
            time.sleep(0.1)
        final = monitor.sample_metrics() or monitor.last
        # If some is still held: is it the good client's (its connections are
        # still open) or nobody's? Close the client and look again.
        held_open_streams = int(final.get("minibatchd_active_streams", -1))
        held_after_client = None
        transport = client.transport
        if back_after is None:
            client.close()
            client = None
            for _ in range(20):
                time.sleep(0.1)
                m = monitor.sample_metrics()
                held_after_client = int(m.get("minibatchd_budget_held_bytes", -1)) if m else None
                if held_after_client == 0:
                    break
        monitor.stop.set()
        monitor.join(timeout=5)
        hwm = rss_of(daemon.pid).get("VmHWM", 0)
        alive = daemon.poll() is None
        cgroup = cap.figures()

        report.update({
            "abusers": abusers,
            "good_client": {"transport": transport, "rounds": k, "verified": good.verified,
                            "errors": sum(good.errors.values()), "errors_by_kind": dict(good.errors),
                            "first_errors": good.first_errors,
                            "first_error_at_s": round(good.error_times[0], 2) if good.error_times else None,
                            "last_error_at_s": round(good.error_times[-1], 2) if good.error_times else None,
                            "latency_p50_ms": percentile_ms(good.latencies, 50),
                            "latency_p99_ms": percentile_ms(good.latencies, 99)},
            "health": {"ok": prober.ok, "total": prober.total, "failures": dict(prober.failures),
                       "fresh_ok": prober.fresh_ok, "fresh_total": prober.fresh_total,
                       "fresh_failures": dict(prober.fresh_failures)},
            "memory": {"peak_rss_bytes": max(hwm, monitor.rss_max), "vm_hwm_bytes": hwm,
                       "polled_rss_max_bytes": monitor.rss_max, "cgroup_usage_max_polled_bytes": monitor.cgroup_usage_max,
                       "cgroup": cgroup},
            "budget": {"held_max_bytes": monitor.held_max,
                       "refusals_total": int(final.get("minibatchd_budget_refusals_total", -1)),
                       "waits_total": int(final.get("minibatchd_budget_waits_total", -1)),
                       "held_after_bytes": int(final.get("minibatchd_budget_held_bytes", -1)),
                       "back_to_zero_after_s": None if back_after is None else round(back_after, 2),
                       "active_streams_then": held_open_streams,
                       "held_after_good_client_closed_bytes": held_after_client},
            "requests": {k2: int(v) for k2, v in final.items() if k2.startswith("minibatchd_requests_total")},
            "active_streams_max": monitor.active_streams_max,
            "daemon_alive": alive,
        })

        # The checks.
        def check(name: str, ok: bool, detail: str):
            report["checks"].append({"check": name, "ok": bool(ok), "detail": detail})

        crashed = [n for n, a in abusers.items() if "crashed" in a["figures"]]
        idle = [n for n, a in abusers.items() if a["attempts"] == 0]
        check("every abuser ran", len(abusers) == len(args.abusers) and not crashed and not idle,
              f"{len(abusers)}/{len(args.abusers)} reported; crashed: {crashed or 'none'}; no attempts: {idle or 'none'}")
        g = report["good_client"]
        check("good client: 0 errors", g["errors"] == 0, f"{g['errors']} errors {g['errors_by_kind'] or ''}".strip())
        check("good client: verified > 0 minibatches", g["verified"] > 0, f"{g['verified']} verified")
        h = report["health"]
        check("health SERVING on every probe", h["total"] > 0 and h["ok"] == h["total"],
              f"{h['ok']}/{h['total']} SERVING {h['failures'] or ''}".strip())
        oom = (cgroup or {}).get("oom_kill") or 0
        check("daemon alive, not OOM-killed", alive and not oom,
              f"alive={alive}, cgroup oom_kill={oom}, exit={daemon.returncode}")
        peak = report["memory"]["peak_rss_bytes"]
        hit = (cgroup or {}).get("failcnt") or 0  # times the cgroup's usage reached its limit
        check("peak memory under the cap", peak < cap.cap and not hit,
              f"peak RSS {peak / MiB:.1f} MiB of {cap.cap / MiB:.0f} MiB"
              + (f"; cgroup max usage {cgroup.get('max_usage_bytes', 0) / MiB:.1f} MiB, limit reached {hit} times"
                 if cap.enforced else " (cap not enforced, measured only)"))
        check("budget never exceeded", monitor.held_max <= budget,
              f"held at most {monitor.held_max / MiB:.2f} of {budget / MiB:.0f} MiB")
        # The well-behaved client may legitimately hold a lease while it is
        # still connected (a stream it opened and has not read to the end);
        # what the abusers held must be gone, and everything once it leaves.
        check(f"budget back to 0 within {BUDGET_RETURN_S:.0f} s", back_after is not None or held_after_client == 0,
              f"after {back_after:.2f} s" if back_after is not None
              else f"{report['budget']['held_after_bytes']} bytes still held {BUDGET_RETURN_S:.0f} s after the "
              f"abusers left, by the well-behaved client's {held_open_streams} open stream(s); "
              f"{held_after_client} once it disconnected")
        report["ok"] = all(c["ok"] for c in report["checks"])
        text = log.read_text(errors="replace")
        report["daemon_log"] = {"lines": text.count("\n"), "bytes": len(text),
                                "warn_lines": text.count(" WARN "), "error_lines": text.count(" ERROR ")}
        report["daemon_log_tail"] = text[-2000:]
        return report
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
            if p.is_alive():
                p.kill()
        if prober is not None:
            prober.stop.set()
            prober.close()
        if monitor is not None:
            monitor.stop.set()
        if client is not None:
            client.close()
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                report["daemon_exit_after_sigterm"] = daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
                report["daemon_exit_after_sigterm"] = "killed after 15 s"
        cap.remove()
        tmp.cleanup()


def mib(b) -> str:
    return "-" if b is None else f"{b / MiB:.1f} MiB"


def print_report(r: dict):
    print(f"\nminibatchd soak: {r['seconds']} s, {r['binary']} (built {r['binary_built']})")
    if len(r["abusers_run"]) < len(ABUSERS):
        print(f"  ONLY these abusers: {', '.join(r['abusers_run'])} (a diagnostic run, not the soak)")
    print(f"  memory cap {r['cap_bytes'] // MiB} MiB: {r['cap']}; budget {r['budget_bytes'] // MiB} MiB; "
          f"handshake deadline flag: {'yes' if r['handshake_flag'] else 'absent from this binary'}")
    print(f"\n{'abuser':<16}{'attempts':>9}  outcomes / figures")
    for name, a in r["abusers"].items():
        outs = "; ".join(f"{k} {v}" for k, v in sorted(a["outcomes"].items(), key=lambda kv: -kv[1]))
        print(f"{name:<16}{a['attempts']:>9}  {outs or '-'}")
        figs = {k: v for k, v in a["figures"].items() if k != "crashed"}
        if figs:
            print(f"{'':<27}{', '.join(f'{k}={v}' for k, v in figs.items())}")
        for k, v in a["times"].items():
            print(f"{'':<27}{k}: n={v['n']} p50 {v['p50_s'] * 1e3:.0f} ms, max {v['max_s'] * 1e3:.0f} ms")
        if "crashed" in a["figures"]:
            print(f"{'':<27}CRASHED: {a['figures']['crashed']}")
    g, h, m, b = r["good_client"], r["health"], r["memory"], r["budget"]
    print(f"\ngood client ({g['transport']}): {g['rounds']} rounds, {g['verified']} minibatches verified, "
          f"{g['errors']} errors, latency p50 {g['latency_p50_ms']} ms, p99 {g['latency_p99_ms']} ms")
    if g["errors"]:
        print(f"  errors from {g['first_error_at_s']} s to {g['last_error_at_s']} s after the abusers started; "
              f"the first ones:")
    for e in g["first_errors"]:
        print(f"  error: {e}")
    print(f"health (kept connection): {h['ok']}/{h['total']} SERVING {h['failures'] or ''}")
    print(f"health (fresh connection each second, information): {h['fresh_ok']}/{h['fresh_total']} SERVING "
          f"{h['fresh_failures'] or ''}")
    cg = m["cgroup"] or {}
    print(f"memory: daemon peak RSS {mib(m['peak_rss_bytes'])} (VmHWM {mib(m['vm_hwm_bytes'])}, polled max "
          f"{mib(m['polled_rss_max_bytes'])})"
          + (f"; cgroup max usage {mib(cg.get('max_usage_bytes'))} (rss {mib(cg.get('rss_bytes'))}, cache "
             f"{mib(cg.get('cache_bytes'))} at the end), failcnt {cg.get('failcnt')}, oom_kill {cg.get('oom_kill')}"
             if cg else ""))
    print(f"budget: held max {mib(b['held_max_bytes'])} of {mib(r['budget_bytes'])}, refusals {b['refusals_total']}, "
          f"waits {b['waits_total']}, back to 0 after {b['back_to_zero_after_s']} s; "
          f"active streams max {r['active_streams_max']}")
    req = collections.Counter()
    for k, v in r["requests"].items():
        mt = re.search(r'method="([^"]*)",code="([^"]*)"', k)
        if mt:
            req[f"{mt.group(1)} {mt.group(2)}"] += v
    print("requests by method and code (server's metrics): " + ", ".join(f"{k} {v}" for k, v in sorted(req.items())))
    lg = r["daemon_log"]
    print(f"daemon log: {lg['lines']} lines ({lg['bytes'] / 1024:.0f} KiB), {lg['warn_lines']} WARN, "
          f"{lg['error_lines']} ERROR")
    print("\nchecks:")
    for c in r["checks"]:
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['detail']}")
    if h["fresh_total"] and h["fresh_ok"] < h["fresh_total"]:
        print(f"  note: {h['fresh_total'] - h['fresh_ok']} of {h['fresh_total']} new connections were turned away "
              f"while idle sockets held --max-connections slots"
              + ("" if r["handshake_flag"] else " (this binary has no handshake deadline: idle sockets keep them)"))
    print(f"\nsoak {'PASSED' if r['ok'] else 'FAILED'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=20, help="how long the abusers run (default 20)")
    ap.add_argument("--cap-mib", type=int, default=256, help="the daemon's memory cap (default 256)")
    ap.add_argument("--binary", help="minibatchd to test (default: target/release or target/debug, the newer)")
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--budget-mib", type=int, default=32, help="--memory-budget-bytes, in MiB (default 32)")
    ap.add_argument("--max-connections", type=int, default=64, help="the daemon's --max-connections (default 64)")
    ap.add_argument("--budget-wait-secs", type=int, default=10,
                    help="the daemon's --budget-wait-secs (default 10, the daemon's own default)")
    ap.add_argument("--request-timeout-secs", type=int, default=2,
                    help="the daemon's --request-timeout-secs (default 2: partial bodies time out within a short soak)")
    ap.add_argument("--handshake-timeout-secs", type=int, default=2,
                    help="the daemon's --handshake-timeout-secs, when the binary has that flag (default 2)")
    ap.add_argument("--transport", choices=("auto", "native", "grpcio"), default="auto",
                    help="the well-behaved client's transport (default: the client's own choice)")
    ap.add_argument("--abusers", default=",".join(ABUSERS),
                    help=f"which abusers run, comma-separated (default: all of {','.join(ABUSERS)}); "
                         "a subset is for finding which one defeats the daemon, not for passing")
    args = ap.parse_args(argv)
    args.abusers = [a.strip() for a in args.abusers.split(",") if a.strip()]
    unknown = [a for a in args.abusers if a not in ABUSERS]
    if unknown or not args.abusers:
        ap.error(f"--abusers: unknown {unknown}; choose from {', '.join(ABUSERS)}")
    if args.seconds < 1 or args.cap_mib < 16:
        ap.error("--seconds must be >= 1 and --cap-mib >= 16")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        report = run(args)
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"soak interrupted ({str(e) or 'Ctrl-C'}); everything it started was stopped", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"soak could not run: {e}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
