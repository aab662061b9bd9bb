"""Wait accounting: is the trainer starved for data?

A trainer that asks "is my GPU waiting on the input pipeline?" needs the
answer on its own side of the wire: the server cannot see how long the
caller was blocked, nor what it did between requests. Every path that hands
minibatches to a caller (Client.get_batch, Client.epoch's iterator,
Attachment.batch/epoch/gather, MinibatchDataset and the DataLoader wrapper
in minibatch_client.torch) times its calls with one `WaitMeter`, this
module, and nothing else:

- **wait**: time the caller spent blocked inside our call or `next()`
  (from entry to return: the request, the network, reassembly, the queue of
  a prefetching stream, the gather of an attached epoch);
- **busy**: time between one call's return and the next call, when no call
  of this meter is in flight: the trainer's own work (forward, backward,
  the optimizer step, logging, evaluation between epochs);
- **wall** = from the first call to the last return; with one calling
  thread, wait + busy = wall exactly. With several threads calling at once,
  wait sums every caller's blocked time (it can exceed wall) and busy
  counts only time when none was in flight; `wait_fraction` stays
  wait / (wait + busy).

Memory is bounded: the per-minibatch waits go into a fixed log-scale
histogram (`BINS_PER_OCTAVE` bins per doubling, 100 ns to ~30 min), whose
quantiles are within ~4.4 % of the exact value (half a bin), never an
ever-growing list. The cost per minibatch is two perf_counter() calls and
two uncontended lock acquisitions (bench/wait_cost.py measures it against
GetBatch(500)).

`MINIBATCH_CLIENT_STATS=0` in the environment (or `stats=False` to a
Client, Attachment connect or MinibatchDataset) turns the accounting off:
the meter is then `NULL_METER`, whose methods do nothing.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

#: environment variable: "0" (or "off", "false", "no") turns accounting off where no flag says otherwise
ENV = "MINIBATCH_CLIENT_STATS"

#: histogram resolution: 8 bins per doubling bound a quantile's relative
#: error by half a bin, 2 ** (1/16) - 1 = 4.4 %: plenty to tell 1 ms from 2 ms
BINS_PER_OCTAVE = 8
#: the smallest wait the histogram resolves (100 ns: below perf_counter's useful resolution for a call)
HIST_MIN_S = 1e-7
#: octaves above HIST_MIN_S: up to 100 ns * 2**34 = ~29 minutes; longer waits land in the top bin
HIST_OCTAVES = 34
_NBINS = BINS_PER_OCTAVE * HIST_OCTAVES + 1
# bound once: stop() runs per minibatch
_now = time.perf_counter
_log2 = math.log2


def enabled_by_default() -> bool:
    """Accounting is on unless MINIBATCH_CLIENT_STATS says 0/off/false/no."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


@dataclass(frozen=True)
class WaitStats:
    """What a caller waited for its minibatches, since the meter's last reset.

    `wait_fraction` is the figure to watch: near 0, the data keeps up and
    the trainer's own step is the bottleneck; near 1, the trainer mostly
    waits for data (the GPU, if any, is starved).
    """

    #: minibatches handed to the caller
    minibatches: int
    #: bytes of the arrays (tensors) handed over: x, y (and indices when asked)
    bytes: int
    #: seconds the caller was blocked in our calls / next(), including calls
    #: that ended without a minibatch (an epoch's end, an error)
    wait_seconds: float
    #: seconds between calls: the caller's own work
    busy_seconds: float
    #: seconds from the first call to the last return
    wall_seconds: float
    #: per-minibatch wait quantiles (seconds; 0.0 with no minibatch), within ~4.4 %
    wait_p50: float
    wait_p99: float
    #: the longest single wait for a minibatch
    wait_max: float
    #: minibatches a prefetching path may keep ready (the largest configured; 0: no prefetch seen)
    prefetch_depth: int = 0
    #: mean minibatches found ready when the caller asked (None: no prefetching path was used)
    prefetch_ready_mean: Optional[float] = None
    #: times the caller found nothing ready and had to wait for the stream
    prefetch_empty: int = 0

    @property
    def wait_fraction(self) -> float:
        """wait / (wait + busy): the share of the caller's time spent waiting for data."""
        total = self.wait_seconds + self.busy_seconds
        return self.wait_seconds / total if total > 0 else 0.0

    @property
    def mean_wait(self) -> float:
        """Mean wait per minibatch (seconds)."""
        return self.wait_seconds / self.minibatches if self.minibatches else 0.0

    def __str__(self) -> str:
        s = (f"{self.minibatches} minibatches, {self.bytes / 1e6:.1f} MB, waiting {100 * self.wait_fraction:.1f} % "
             f"({self.wait_seconds:.3f} s of {self.wait_seconds + self.busy_seconds:.3f} s; per minibatch p50 "
             f"{1e3 * self.wait_p50:.2f} ms, p99 {1e3 * self.wait_p99:.2f} ms)")
        if self.prefetch_ready_mean is not None:
            s += (f", prefetch {self.prefetch_ready_mean:.2f} of {self.prefetch_depth} ready on average, "
                  f"{self.prefetch_empty} times none")
        return s


class WaitMeter:
    """The accounting behind every `stats()`: thread-safe, fixed memory.

    Use it around each call that hands the caller a minibatch:

        t0 = meter.start()
        try:
            out = fetch()
        except BaseException:
            meter.stop(t0)              # the wait counts; no minibatch
            raise
        meter.stop(t0, nbytes(out), minibatch=True)

    or wrap an iterator: `meter.iterate(it, nbytes)`.
    """

    enabled = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Starts counting afresh (e.g. at each epoch for per-epoch figures).
        A call in flight during reset counts its wait in the new period."""
        with self._lock:
            self._minibatches = 0
            self._bytes = 0
            self._wait = 0.0
            self._busy = 0.0
            self._first: Optional[float] = None
            self._last_end: Optional[float] = None
            self._hist = [0] * _NBINS
            self._max = 0.0
            self._depth = 0
            self._ready_sum = 0
            self._ready_n = 0
            self._empty = 0
            # _in_flight survives a reset: those calls still end
            if not hasattr(self, "_in_flight"):
                self._in_flight = 0

    def start(self) -> float:
        """A call begins: returns its start time for stop(). The gap since
        the previous return, when nothing was in flight, was busy time."""
        t = _now()
        with self._lock:
            if self._in_flight == 0 and self._last_end is not None:
                self._busy += t - self._last_end
            if self._first is None:
                self._first = t
            self._in_flight += 1
        return t

    def stop(self, t0: float, nbytes: int = 0, *, minibatch: bool = False, ready: Optional[int] = None) -> None:
        """The call that start() returned t0 for ends now. minibatch: it
        handed one over (of nbytes); ready: minibatches a prefetching path
        had ready when the caller asked (None where there is no prefetch)."""
        t = _now()
        w = t - t0
        if minibatch:  # the bin outside the lock
            b = int(_log2(w / HIST_MIN_S) * BINS_PER_OCTAVE) + 1 if w > HIST_MIN_S else 0
            if b >= _NBINS:
                b = _NBINS - 1
        with self._lock:
            if self._in_flight > 0:
                self._in_flight -= 1
            self._wait += w
            self._last_end = t
            if self._first is None:  # reset while in flight
                self._first = t0
            if minibatch:
                self._minibatches += 1
                self._bytes += nbytes
                self._hist[b] += 1
                if w > self._max:
                    self._max = w
                if ready is not None:
                    self._ready_sum += ready
                    self._ready_n += 1
                    if ready == 0:
                        self._empty += 1

    def prefetching(self, depth: int) -> None:
        """A prefetching path keeping up to `depth` minibatches ready starts."""
        with self._lock:
            self._depth = max(self._depth, int(depth))

    def snapshot(self, reset: bool = False) -> WaitStats:
        """The figures so far (and a fresh start with reset=True, atomically:
        no minibatch is lost or counted twice between two periods)."""
        with self._lock:
            wall = (self._last_end - self._first) if (self._first is not None and self._last_end is not None) else 0.0
            out = WaitStats(
                minibatches=self._minibatches, bytes=self._bytes, wait_seconds=self._wait, busy_seconds=self._busy,
                wall_seconds=max(wall, 0.0), wait_p50=_quantile(self._hist, self._minibatches, 0.50, self._max),
                wait_p99=_quantile(self._hist, self._minibatches, 0.99, self._max), wait_max=self._max,
                prefetch_depth=self._depth,
                prefetch_ready_mean=(self._ready_sum / self._ready_n) if self._ready_n else None,
                prefetch_empty=self._empty)
        if reset:
            self.reset()
        return out

    def iterate(self, it: Iterable[T], nbytes: Callable[[T], int],
                ready: Optional[Callable[[], Optional[int]]] = None) -> Iterator[T]:
        """Yields its items, timing each next() as a wait; the time the
        caller holds each item (until it asks for the next) is busy.
        ready(): minibatches ready before each next(), for a prefetching it."""
        it = iter(it)
        while True:
            r = ready() if ready is not None else None
            t0 = self.start()
            try:
                item = next(it)
            except StopIteration:
                self.stop(t0)
                return
            except BaseException:
                self.stop(t0)
                raise
            self.stop(t0, nbytes(item), minibatch=True, ready=r)
            yield item


class _NullMeter(WaitMeter):
    """Accounting off: every method does nothing; snapshot() is all zeros."""

    enabled = False

    def __init__(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def start(self) -> float:
        return 0.0

    def stop(self, t0: float, nbytes: int = 0, *, minibatch: bool = False, ready: Optional[int] = None) -> None:
        pass

    def prefetching(self, depth: int) -> None:
        pass

    def snapshot(self, reset: bool = False) -> WaitStats:
        return WaitStats(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def iterate(self, it, nbytes, ready=None):
        return iter(it)


#: the meter of a path with accounting off
NULL_METER: WaitMeter = _NullMeter()


def meter(enabled: Optional[bool] = None) -> WaitMeter:
    """A new WaitMeter, or NULL_METER when accounting is off (enabled=False,
    or None and MINIBATCH_CLIENT_STATS=0)."""
    on = enabled_by_default() if enabled is None else bool(enabled)
    return WaitMeter() if on else NULL_METER


def nbytes(arrays) -> int:
    """Bytes of a minibatch as handed over: a tuple of arrays or tensors."""
    n = 0
    for a in arrays:
        b = getattr(a, "nbytes", None)
        if b is None:  # torch.Tensor: nbytes exists from torch 1.11; be lenient
            b = a.numel() * a.element_size()
        n += int(b)
    return n


def _bin(w: float) -> int:
    """The histogram bin of a wait (stop() inlines the same rule)."""
    if w <= HIST_MIN_S:
        return 0
    b = int(math.log2(w / HIST_MIN_S) * BINS_PER_OCTAVE) + 1
    return b if b < _NBINS else _NBINS - 1


def _quantile(hist: list, n: int, q: float, top: float) -> float:
    """The q-quantile of n counted waits: the geometric middle of its bin,
    capped at the largest wait seen."""
    if n == 0:
        return 0.0
    rank = max(1, math.ceil(q * n))
    seen = 0
    for i, c in enumerate(hist):
        seen += c
        if seen >= rank:
            if i == 0:
                return min(HIST_MIN_S, top)
            mid = HIST_MIN_S * 2.0 ** ((i - 0.5) / BINS_PER_OCTAVE)
            return min(mid, top)
    return top
