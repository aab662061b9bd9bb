"""The status page (README "Status page") in a real browser: headless
Chromium loads `GET /` from a daemon serving the bundled sample while
`minibatchd bench` streams, with JavaScript on (the live refresh fetches
/status.json; the page as served, without it, has every table too), and
takes a screenshot.

Skipped only when Chromium is absent and CI is unset; under CI a missing
Chromium fails (scripts/test.sh installs it). Set STATUS_PAGE_SCREENSHOT to
a path to keep the screenshot (docs/status-page.png was made this way).

Run: python3 -m pytest tests/python/test_status_page.py  (after `cargo build`)
"""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from paths import ROOT, binary

START_TIMEOUT_S = 30
BROWSER_TIMEOUT_S = 90


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed and CI is set: scripts/test.sh installs it "
                    "(apt-get install -y chromium)", pytrace=False)
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Straight to the daemon on loopback, whatever proxy the environment names.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(url: str) -> tuple[int, bytes]:
    """Status and body; (0, b"") while nothing listens yet."""
    try:
        with OPENER.open(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, b""


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def held_stream(addr: str, token: str) -> socket.socket:
    """A StreamBatches call that stays open: HTTP/2 by hand (as
    scripts/soak.py frames it) with a 1-byte stream window, never widened,
    so the server sends nothing and the stream waits (grpcio would read
    the sample's whole 9 MB epoch into its buffers and end it)."""
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)

    def literal(name: str, value: str) -> bytes:  # no indexing, no Huffman
        n, v = name.encode(), value.encode()
        assert len(n) < 127 and len(v) < 127
        return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v

    headers = b"".join(literal(n, v) for n, v in [
        (":method", "POST"), (":scheme", "http"), (":path", "/minibatch.v1.BatchService/StreamBatches"),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
        ("authorization", f"Bearer {token}"), ("x-trainer-id", "browser-test")])
    request = b"\x0a\x05train\x10\x01"  # StreamBatchesRequest{set: "train", size: 1}
    message = b"\x00" + struct.pack(">I", len(request)) + request
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, struct.pack(">HI", 4, 1))
              + frame(1, 0x4, 1, headers) + frame(0, 0x1, 1, message))
    # Acknowledge the server's SETTINGS (it closes connections that do not).
    while True:
        head = s.recv(9, socket.MSG_WAITALL)
        assert len(head) == 9, "the server closed the connection"
        n, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        if n:
            s.recv(n, socket.MSG_WAITALL)
        if kind == 4 and not flags & 0x1:
            s.sendall(frame(4, 0x1, 0))
            return s


@pytest.fixture
def daemon(tmp_path):
    """`minibatchd serve` (bundled sample, a token) and `bench` streaming at it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIBATCHD_")}
    env["MINIBATCHD_LOG"] = "warn"
    addr, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen([str(binary()), "serve", "--no-pin", "--addr", addr, "--metrics-addr", metrics,
                             "--auth-token", "page-token"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    bench = held = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while fetch(f"http://{metrics}/status.json?token=page-token")[0] != 200:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the daemon's status page never answered"
            time.sleep(0.1)
        # One stream held open while the browser looks, and bench's
        # short epoch streams one after another (the throughput).
        held = held_stream(addr, "page-token")
        bench = subprocess.Popen([str(binary()), "bench", "--server", addr, "--token", "page-token",
                                  "--method", "stream-batches", "--size", "50", "--shuffle",
                                  "--duration", "120"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            body = fetch(f"http://{metrics}/status.json?token=page-token")[1]
            if b'"trainer":"browser-test"' in body and b'"size":50,' in body:
                break
            assert time.monotonic() < deadline, f"the held stream or bench's never showed: {body[:2000]}"
            time.sleep(0.05)
        yield metrics
    finally:
        if held is not None:
            held.close()
        for p in (bench, proc):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        log.close()


def browser(*args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--window-size=1280,1400", *args]
    return subprocess.run(cmd, capture_output=True, timeout=BROWSER_TIMEOUT_S)


def png_facts(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the decompressed (still filtered) pixel rows of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    return size[0], size[1], zlib.decompress(idat)


def test_the_page_in_a_real_browser(daemon, tmp_path):
    url = f"http://{daemon}/?token=page-token&set=train&index=2&size=64"
    # JavaScript on: the refresh ran (virtual time lets its fetch finish).
    r = browser("--virtual-time-budget=5000", "--dump-dom", url)
    dom = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert '<table id="datasets">' in dom, dom[:3000]
    assert "<td>train</td>" in dom and "3000" in dom
    assert ('<img class="grid" id="minibatch" src="/minibatch.png?dataset=mnist-sample&amp;set=train&amp;index=2'
            '&amp;size=64&amp;scale=2&amp;token=page-token"') in dom, dom
    assert '<pre class="labels" id="labels">' in dom
    assert "live: updated" in dom, "the script refreshed the page from /status.json"
    assert "<td>browser-test</td>" in dom, "the held stream is listed"

    # JavaScript off: the same tables, rendered by the daemon. (Headless
    # Chromium's --dump-dom and --screenshot stop working with scripts
    # disabled, so the page as served stands for what such a browser shows.)
    status, body = fetch(url)
    html = body.decode()
    assert status == 200
    assert '<table id="datasets">' in html and 'id="minibatch"' in html
    assert "a snapshot: with JavaScript on" in html
    assert "<td>browser-test</td>" in html

    # Without the token: refused, the browser sees the message.
    r = browser("--dump-dom", f"http://{daemon}/")
    assert "requires its bearer token" in r.stdout.decode()

    shot = Path(os.environ.get("STATUS_PAGE_SCREENSHOT") or tmp_path / "status-page.png")
    r = browser("--virtual-time-budget=5000", f"--screenshot={shot}", url)
    assert r.returncode == 0 and shot.is_file(), r.stderr.decode()[-2000:]
    w, h, rows = png_facts(shot.read_bytes())
    assert (w, h) == (1280, 1400)
    # Not a blank page: many distinct byte values, and the file is larger
    # than a flat colour's few hundred bytes.
    assert shot.stat().st_size > 30_000, shot.stat().st_size
    assert len(set(rows)) > 200
