"""Kills one minibatchd replica while a client streams an epoch, and checks that
the client still receives every minibatch exactly once, byte for byte.

Run by deploy/test.sh on the host, against the replicas' published loopback
ports, with the Python client (clients/python) importable:

    python3 failover_check.py --replica 127.0.0.1:PORT1=CONTAINER1 \
        --replica 127.0.0.1:PORT2=CONTAINER2 --replica 127.0.0.1:PORT3=CONTAINER3

One Client gets every replica's address. It streams a shuffled epoch of
`--set` in minibatches of `--size` (with the example indices), reading slowly
(`--delay` seconds a minibatch, like a trainer) so the stream is still open
when, after `--kill-after` minibatches, this script `docker kill`s the
container of the replica that is streaming. The client must then resume the
epoch on another replica. Checks:
  * a failover happened, away from the killed replica;
  * every example index of the set arrived exactly once, and the minibatch
    count is the epoch's;
  * every x and y row equals the set's rows fetched afterwards with GetBatch
    (from the surviving replicas), so no minibatch was lost, repeated or torn.
Exit 0 when all hold; prints one line a check.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np

from minibatch_client import Client


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replica", action="append", required=True, metavar="ADDR=CONTAINER",
                   help="a replica's address and its container's name (repeat for each)")
    p.add_argument("--set", default="train")
    p.add_argument("--size", type=int, default=25, help="minibatch size")
    p.add_argument("--kill-after", type=int, default=8, help="minibatches to receive before the kill")
    p.add_argument("--delay", type=float, default=0.01, help="seconds spent on each minibatch")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()

    containers = dict(r.split("=", 1) for r in a.replica)
    addresses = list(containers)
    failures = 0

    def check(ok: bool, what: str) -> None:
        nonlocal failures
        print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
        failures += not ok

    with Client(addresses, timeout=20) as client:
        info = client.info()
        n = info.sets[a.set].examples
        batches = client.num_batches(a.set, a.size)
        print(f"dataset {info.source}, fingerprint {info.fingerprint[:16]}..., set {a.set}: "
              f"{n} examples, {batches} minibatches of {a.size}; replicas {', '.join(addresses)}", flush=True)
        if batches <= a.kill_after + 2:
            print(f"error: only {batches} minibatches: too few to kill a replica mid-epoch", file=sys.stderr)
            return 2

        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        idxs: list[np.ndarray] = []
        killed = None
        t0 = time.monotonic()
        it = client.epoch(a.set, a.size, shuffle=True, seed=a.seed, epoch=1, with_indices=True, prefetch=0)
        with it:
            for k, (x, y, idx) in enumerate(it, start=1):
                xs.append(np.array(x))
                ys.append(np.array(y))
                idxs.append(np.array(idx))
                if k == a.kill_after:
                    killed = it.address
                    name = containers[killed]
                    subprocess.run(["docker", "kill", name], check=True, stdout=subprocess.DEVNULL)
                    print(f"killed {name} ({killed}) after minibatch {k} of {batches}", flush=True)
                time.sleep(a.delay)
            failovers = list(it.failovers)
            last = it.address
        elapsed = time.monotonic() - t0

        for f in failovers:
            print(f"failover: {f.address} failed, resumed at minibatch {f.next_index} on the next replica "
                  f"({f.error.splitlines()[0][:120]})", flush=True)
        check(killed is not None, "a replica was killed mid-epoch")
        check(bool(failovers) and failovers[0].address == killed,
              f"the stream failed over from the killed replica ({len(failovers)} failover(s))")
        check(last is not None and last != killed, f"the epoch finished on a surviving replica ({last})")
        check(len(idxs) == batches, f"{len(idxs)} minibatches received, {batches} expected")
        seen = np.bincount(np.concatenate(idxs), minlength=n) if idxs else np.zeros(n, dtype=np.int64)
        check(bool((seen == 1).all()),
              f"every example exactly once: {int((seen == 1).sum())}/{n} once, "
              f"{int((seen == 0).sum())} missing, {int((seen > 1).sum())} repeated")

        # Reference rows from the survivors (GetBatch in the file's order).
        limit = info.limits.max_batch_size
        ref_x, ref_y = [], []
        for start in range(0, n, limit):
            size = min(limit, n)
            x, y = client.get_batch(a.set, start // size, size)
            ref_x.append(np.array(x))
            ref_y.append(np.array(y))
        rx, ry = np.concatenate(ref_x), np.concatenate(ref_y)
        order = np.concatenate(idxs)
        same = np.array_equal(np.concatenate(xs), rx[order]) and np.array_equal(np.concatenate(ys), ry[order])
        check(same, "every minibatch's x and y equal the set's rows by index (GetBatch reference)")
        print(f"streamed {len(idxs)} minibatches in {elapsed:.1f}s", flush=True)

    print("failover check: " + ("passed" if failures == 0 else f"{failures} check(s) FAILED"), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
