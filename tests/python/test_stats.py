"""Wait accounting (issue 16, item 1): minibatch_client.stats and every path
that uses it, against a real daemon serving the bundled sample, on both
transports (the native one where installed, and grpcio) and attached.

What is asserted is structure and directions with wide margins, never a
speed: counts equal the minibatches fetched, bytes equal the arrays' bytes,
wait + busy equals the meter's wall time and lies within the test's own
clock, a consumer that sleeps 20 ms per minibatch waits for a small share
of its time while one that does nothing waits for most of it.

Run: MINIBATCHD=target/debug/minibatchd python3 -m pytest tests/python/test_stats.py
"""
from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

from paths import ROOT
sys.path.insert(0, str(ROOT / "clients" / "python"))

import minibatch_client as mc  # noqa: E402
from minibatch_client import stats  # noqa: E402
from test_attach import UdsDaemon  # noqa: E402
from test_client import EXAMPLES  # noqa: E402

#: the sleep of a "slow" consumer: well above a minibatch's fetch on a loaded machine (~1-10 ms)
SLOW_S = 0.02


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = UdsDaemon(tmp_path_factory.mktemp("stats"))
    yield d
    d.stop()


@pytest.fixture(params=["default", "grpcio"])
def client(request, daemon):
    """The default transport (native where installed) and grpcio."""
    native = None if request.param == "default" else False
    with mc.Client(daemon.address, timeout=30, native=native) as c:
        yield c


def consistent(s: stats.WaitStats, outside_s: float) -> None:
    """The invariants of one caller's figures: wait + busy is the meter's
    wall time, which lies within the caller's own clock around the calls."""
    assert s.wait_seconds >= 0 and s.busy_seconds >= 0
    assert s.wait_seconds + s.busy_seconds == pytest.approx(s.wall_seconds, rel=1e-6, abs=1e-6)
    assert s.wall_seconds <= outside_s + 1e-3
    assert 0.0 <= s.wait_fraction <= 1.0
    if s.minibatches:
        assert 0 < s.wait_p50 <= s.wait_p99 <= s.wait_max <= s.wait_seconds + 1e-9
        assert s.mean_wait <= s.wait_max


# --- the meter itself ---------------------------------------------------------------------------

def test_quantiles_within_half_a_bin_and_memory_fixed():
    m = stats.WaitMeter()
    waits = np.geomspace(1e-5, 1e-1, 20001)  # 10 us .. 100 ms
    for w in waits:  # what stop() records, without the clock: one bin per wait
        m._hist[stats._bin(float(w))] += 1
    m._minibatches, m._max = len(waits), float(waits[-1])
    s = m.snapshot()
    tol = 2 ** (1 / (2 * stats.BINS_PER_OCTAVE)) - 1
    assert s.wait_p50 == pytest.approx(float(np.quantile(waits, 0.5)), rel=tol + 1e-3)
    assert s.wait_p99 == pytest.approx(float(np.quantile(waits, 0.99)), rel=tol + 1e-3)
    assert len(m._hist) == stats.BINS_PER_OCTAVE * stats.HIST_OCTAVES + 1  # whatever was recorded
    assert stats._bin(0.0) == 0 and stats._bin(1e9) == len(m._hist) - 1  # out of range: clamped


def test_meter_counts_threads_and_reset():
    m = stats.WaitMeter()
    m.prefetching(3)

    def work():
        for _ in range(200):
            t0 = m.start()
            m.stop(t0, 10, minibatch=True, ready=1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = m.snapshot(reset=True)
    assert (s.minibatches, s.bytes, s.prefetch_depth, s.prefetch_ready_mean, s.prefetch_empty) == (800, 8000, 3, 1.0, 0)
    assert m._in_flight == 0
    t0 = m.start()
    m.stop(t0)  # a call without a minibatch (an error, an epoch's end): waited, not counted
    s = m.snapshot()
    assert (s.minibatches, s.bytes, s.prefetch_depth, s.prefetch_ready_mean) == (0, 0, 0, None)
    assert s.wait_seconds > 0 and s.wait_p50 == 0.0


def test_off_by_flag_and_environment(daemon, monkeypatch):
    with mc.Client(daemon.address, stats=False) as c:
        c.get_batch("train", 0, 100)
        assert c.stats() == stats.WaitStats(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    monkeypatch.setenv(stats.ENV, "0")
    with mc.Client(daemon.address) as c, mc.Client(daemon.address, stats=True) as on:
        c.get_batch("train", 0, 100)
        on.get_batch("train", 0, 100)
        assert c.stats().minibatches == 0 and on.stats().minibatches == 1
    with mc.Client(daemon.target).attach() as a:
        a.batch("train", 0, 100)
        assert a.stats().minibatches == 0


# --- the client: GetBatch and epochs -------------------------------------------------------------

def test_get_batch_counts_bytes_and_time(client):
    t_start = time.perf_counter()
    want_bytes = 0
    for i in range(6):
        x, y = client.get_batch("train", i, 500)
        want_bytes += x.nbytes + y.nbytes
    x, y, idx = client.get_batch("train", 1, 300, x_dtype="uint8", with_indices=True)
    want_bytes += x.nbytes + y.nbytes + idx.nbytes
    with pytest.raises(mc.OutOfRange):
        client.get_batch("train", 99, 500)  # waited for, no minibatch
    s = client.stats()
    consistent(s, time.perf_counter() - t_start)
    assert (s.minibatches, s.bytes) == (7, want_bytes)
    assert s.prefetch_ready_mean is None and s.prefetch_depth == 0  # GetBatch does not prefetch
    again = client.stats(reset=True)
    assert again.minibatches == 7 and client.stats().minibatches == 0


def test_epoch_slow_consumer_waits_little_fast_one_mostly(client):
    size, n = 100, EXAMPLES["train"] // 100
    client.reset_stats()
    t_start = time.perf_counter()
    got = 0
    for x, y in client.epoch("train", size, shuffle=True, seed=1, prefetch=2):
        got += x.nbytes + y.nbytes
        time.sleep(SLOW_S)  # the trainer's step
    slow = client.stats(reset=True)
    consistent(slow, time.perf_counter() - t_start)
    assert (slow.minibatches, slow.bytes) == (n, got)
    assert slow.busy_seconds >= (n - 1) * SLOW_S * 0.9  # every sleep but the last sits between two next()
    assert slow.prefetch_depth == 2 and slow.prefetch_ready_mean is not None
    # while the consumer sleeps the stream fills the queue: mostly something ready
    assert slow.prefetch_ready_mean > 0.5 and slow.prefetch_empty < n
    assert slow.wait_fraction < 0.5, slow

    for _ in client.epoch("train", size, shuffle=True, seed=1, prefetch=0):  # no step, no prefetch
        pass
    fast = client.stats(reset=True)
    assert fast.minibatches == n and fast.prefetch_ready_mean is None
    assert fast.wait_fraction > 0.5 and fast.wait_fraction > slow.wait_fraction, (fast, slow)
    assert fast.wait_p50 > 0


def test_concurrent_callers_each_counted(client):
    client.reset_stats()
    sizes = []
    lock = threading.Lock()

    def work(k):
        for i in range(5):
            x, y = client.get_batch("train", (k + i) % 6, 500)
            with lock:
                sizes.append(x.nbytes + y.nbytes)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = client.stats()
    assert (s.minibatches, s.bytes) == (15, sum(sizes))
    assert 0.0 <= s.wait_fraction <= 1.0 and s.busy_seconds <= s.wall_seconds + 1e-6


# --- attached -----------------------------------------------------------------------------------

def test_attachment_batches_and_gathers(daemon):
    with mc.Client(daemon.target).attach() as a:
        t_start = time.perf_counter()
        want = 0
        for i in range(6):
            x, y = a.batch("train", i, 500)
            want += x.nbytes + y.nbytes
        with pytest.raises(mc.OutOfRange):
            a.batch("train", 6, 500)
        for x, y in a.epoch("train", 250, shuffle=True, seed=2):
            want += x.nbytes + y.nbytes
            time.sleep(SLOW_S)
        s = a.stats(reset=True)
        consistent(s, time.perf_counter() - t_start)
        assert (s.minibatches, s.bytes) == (6 + 12, want)
        # a view or a memcpy against a 20 ms step: the data is never the bottleneck
        assert s.wait_fraction < 0.5, s
        assert a.stats().minibatches == 0
