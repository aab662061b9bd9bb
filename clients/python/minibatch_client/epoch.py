"""Epochs: one StreamBatches call yielding minibatches in order, prefetched on
a background thread, resumed on the next server from the next minibatch
when one fails, so that each minibatch is seen exactly once.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

from ._proto import minibatch_pb2 as pb
from .errors import FAILOVER_CODES, MinibatchError, OutOfRange, Unavailable
from .expect import Expected
from .stats import NULL_METER, WaitMeter, nbytes
from .wire import Batch

if TYPE_CHECKING:  # the Client that starts epochs; imported by it
    from .client import Client


@dataclass(frozen=True)
class Failover:
    """One switch of an epoch stream to another server."""

    address: str
    #: the minibatch index the stream resumed from
    next_index: int
    error: str


class _End:
    pass


class _Raise:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Stream:
    """The state of one epoch stream, shared by EpochIterator and its prefetch
    thread. The thread holds only this object, never the EpochIterator, so an
    abandoned iterator is collected, and its __del__ stops the thread."""

    def __init__(self, client: "Client", req: pb.StreamBatchesRequest, start: int, count: int, decode: bool,
                 with_indices: bool, prefetch: int):
        self.client = client
        self.req = req
        self.start = start
        self.count = count
        self.position = start
        self.decode = decode
        self.with_indices = with_indices
        self.failovers: list[Failover] = []
        self.address: Optional[str] = None
        self.call = None
        self.stop = threading.Event()
        self.queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))

    def batches(self) -> Iterator[Batch]:
        """Minibatches from position on, moving to the next server on failure
        (with the same order, its offset included: positions count
        minibatches of that order)."""
        client = self.client
        replicas = client._replicas
        n = len(replicas)
        k = client._pick()
        failed_in_a_row = 0
        resumed = False
        while not self.stop.is_set():
            if self.count and self.position - self.start >= self.count:
                return
            r = replicas[k]
            self.address = r.address
            req = pb.StreamBatchesRequest()
            req.CopyFrom(self.req)
            req.start = self.position
            req.count = self.count - (self.position - self.start) if self.count else 0
            progressed = False
            call = None
            try:
                expected = Expected.stream_batches(req, client._described(r))
                call = self.call = r.transport.stream_batches(req, expected, client.stream_timeout)
                for b in call:  # in order from req.start: `expected` makes sure
                    self.position += 1
                    progressed = True
                    client.last_address = r.address
                    yield b
                    if self.stop.is_set():
                        return
                return
            except MinibatchError as e:
                if self.stop.is_set():  # cancelled by close()
                    return
                err = e
            finally:
                if call is not None:
                    call.cancel()  # no-op when the call is complete
            if isinstance(err, OutOfRange) and resumed and self.position > self.start:
                # The failed server had sent every minibatch; only the end of
                # its stream was lost.
                return
            if err.code not in FAILOVER_CODES or n == 1:
                raise err
            failed_in_a_row = 1 if progressed else failed_in_a_row + 1
            self.failovers.append(Failover(r.address, self.position, str(err)))
            if failed_in_a_row >= n:
                raise Unavailable(
                    f"no server could continue the epoch at minibatch {self.position}: "
                    + "; ".join(f.error for f in self.failovers[-n:]),
                    address=",".join(client.addresses))
            k = (k + 1) % n
            resumed = True

    def outputs(self, b: Batch):
        return b.arrays(self.decode, self.with_indices)

    def run(self) -> None:
        """The prefetch thread: fills the queue, ends with _End or _Raise."""
        gen = self.batches()
        try:
            for b in gen:
                if not self.put(self.outputs(b)):
                    return
            self.put(_End())
        except BaseException as e:  # handed to the consumer
            self.put(_Raise(e))
        finally:
            gen.close()

    def put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def cancel(self) -> None:
        self.stop.set()
        call = self.call
        if call is not None:
            call.cancel()


class EpochIterator:
    """Iterator over one epoch's minibatches (see Client.epoch).

    position:  index of the next minibatch to receive from the server
    failovers: each switch to another server (address, resumed index, error)
    address:   the server now streaming
    ready:     minibatches fetched and waiting for next() (None without prefetch)

    Each next() is timed into `meter` (the Client's: Client.stats()): the
    time the caller is blocked in it is what it waited for data, with the
    prefetch queue's fill when it asked.
    """

    def __init__(self, client: "Client", req: pb.StreamBatchesRequest, start: int, count: int, prefetch: int,
                 decode: bool, with_indices: bool, meter: WaitMeter = NULL_METER):
        self.prefetch = max(prefetch, 0)
        self._s = _Stream(client, req, start, count, decode, with_indices, self.prefetch)
        self._meter = meter
        if self.prefetch:
            meter.prefetching(self.prefetch)
        self._closed = False
        self._gen: Optional[Iterator[Batch]] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def position(self) -> int:
        return self._s.position

    @property
    def failovers(self) -> list[Failover]:
        return self._s.failovers

    @property
    def address(self) -> Optional[str]:
        return self._s.address

    @property
    def ready(self) -> Optional[int]:
        if self.prefetch == 0:
            return None
        return self._s.queue.qsize()

    def __iter__(self) -> "EpochIterator":
        return self

    def __next__(self):
        meter = self._meter
        ready = self._s.queue.qsize() if self.prefetch and not self._closed else None
        t0 = meter.start()
        try:
            out = self._next()
        except BaseException:  # StopIteration too: the caller waited for the end
            meter.stop(t0)
            raise
        meter.stop(t0, nbytes(out), minibatch=True, ready=ready)
        return out

    def _next(self):
        if self._closed:
            raise StopIteration
        if self.prefetch == 0:
            if self._gen is None:
                self._gen = self._s.batches()
            try:
                b = next(self._gen)
            except BaseException:
                self.close()
                raise
            return self._s.outputs(b)
        if self._thread is None:
            self._thread = threading.Thread(target=self._s.run, name="minibatch-prefetch", daemon=True)
            self._thread.start()
        item = self._s.queue.get()
        if isinstance(item, _End):
            self.close()
            raise StopIteration
        if isinstance(item, _Raise):
            self.close()
            raise item.exc
        return item

    def close(self) -> None:
        """Stops the stream: cancels the call and ends the prefetch thread."""
        if self._closed:
            return
        self._closed = True
        self._s.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if self._gen is not None:
            self._gen.close()

    def __enter__(self) -> "EpochIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
