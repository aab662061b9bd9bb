"""The attach check of deploy/test.sh: a trainer in a container of its own
attaches to a daemon in another through the socket in their shared volume,
and the bytes it maps are the bytes GetBatch sends.

Two halves, one file:

  * in the trainer's container (deploy/local/stage.sh puts this file at
    /app/attach_check.py in the local trainer image; test.sh runs it with
    `compose run` of the trainer-attached service: its volume, its group, no
    network):

        python3 /app/attach_check.py attach /run/minibatchd/minibatchd.sock

    attaches (Client("unix://...").attach(), and x_dtype="uint8"), runs
    verify(), checks that the mapping is a memfd (not /dev/shm) and that an
    in-order minibatch is a read-only view of it, compares every minibatch
    below with GetBatch over gRPC on the same socket and the shuffled epoch
    with StreamBatches, and prints one `digest` line per minibatch: its
    request and the sha256 of its attached bytes (x then y);

  * on the host, against a published TCP port:

        python3 attach_check.py compare 127.0.0.1:PORT DIGESTS

    fetches each of those minibatches with GetBatch over TCP (and GetInfo's
    fingerprint) and compares the sha256 of its bytes with the line's.

Minibatches: every one of size 500 of every set in file order, a partial
last one (train, size 700), the uint8 mirror's (train, size 500), and a
shuffled epoch of train (size 500, seed 7, epoch 1). Each half prints one
line per check and exits 0 when all hold.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np

from minibatch_client import Client

SIZE = 500
PARTIAL = ("train", 700)
SEED, EPOCH = 7, 1


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, ok: bool, what: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
        self.failed += not ok


def digest(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (x, y):
        h.update(f"{a.dtype.str} {a.shape}\n".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def requests(sets: dict[str, int]):
    """(set, index, size, shuffle, x_dtype) of every minibatch checked."""
    for name, n in sets.items():
        for i in range(-(-n // SIZE)):
            yield name, i, SIZE, False, "stored"
    name, size = PARTIAL
    yield name, -(-sets[name] // size) - 1, size, False, "stored"
    yield "train", 1, SIZE, False, "uint8"
    for i in range(-(-sets["train"] // SIZE)):
        yield "train", i, SIZE, True, "stored"


def attach_side(path: str) -> int:
    check = Checks()
    print(f"attach_check: uid {os.getuid()}, groups {sorted(os.getgroups())}, socket {path}", flush=True)
    target = "unix://" + path
    with Client(target, timeout=30) as c, c.attach() as a, c.attach(x_dtype="uint8") as a8:
        sets = {name: s.examples for name, s in a.sets.items()}
        print(f"attached: fingerprint {a.fingerprint}, generation {a.generation}, sets {sets}", flush=True)
        check(a.verify() and a8.verify(), "verify(): the sha256 of every region (stored x, y, the uint8 mirror)")
        check(c.info().fingerprint == a.fingerprint == a8.fingerprint,
              "the attachment's fingerprint is GetInfo's (gRPC on the same socket)")
        maps = [line.split(None, 5)[-1].strip() for line in open("/proc/self/maps") if "memfd:" in line]
        check(bool(maps) and all(m.startswith("/memfd:") for m in maps),
              f"mapped from a memfd passed over the socket, not /dev/shm: {sorted(set(maps))}")
        x, y = a.batch("train", 0, SIZE)
        check(not x.flags.writeable and not x.flags.owndata and not y.flags.writeable,
              "an in-order minibatch is a read-only view of the mapping (no copy)")

        same = 0
        reqs = list(requests(sets))
        shuffled = {}
        for s, i, size, shuffle, xd in reqs:
            if shuffle:
                continue
            src = a8 if xd == "uint8" else a
            ax, ay = src.batch(s, i, size)
            gx, gy = c.get_batch(s, i, size, x_dtype=None if xd == "stored" else xd)
            same += np.array_equal(ax, gx) and np.array_equal(ay, gy) and ax.dtype == gx.dtype
        for i, (ax, ay) in enumerate(a.epoch("train", SIZE, shuffle=True, seed=SEED, epoch=EPOCH)):
            shuffled[i] = (ax, ay)
        with c.epoch("train", SIZE, shuffle=True, seed=SEED, epoch=EPOCH) as it:
            for i, (gx, gy) in enumerate(it):
                same += i in shuffled and np.array_equal(shuffled[i][0], gx) and np.array_equal(shuffled[i][1], gy)
        check(same == len(reqs), f"{same}/{len(reqs)} attached minibatches equal GetBatch / StreamBatches "
                                 f"(gRPC on the same socket)")

        for s, i, size, shuffle, xd in reqs:
            if shuffle:
                ax, ay = shuffled[i]
            else:
                ax, ay = (a8 if xd == "uint8" else a).batch(s, i, size)
            print(f"digest {s} {i} {size} {int(shuffle)} {xd} {digest(ax, ay)} {a.fingerprint}")
    print(f"attach_check: {'passed' if not check.failed else 'FAILED'}", flush=True)
    return 1 if check.failed else 0


def compare_side(address: str, digests: str) -> int:
    check = Checks()
    lines = [line.split() for line in open(digests) if line.startswith("digest ")]
    check(len(lines) > 0, f"{len(lines)} digests from the attached container")
    with Client(address, timeout=30) as c:
        fp = c.info().fingerprint
        check(all(line[7] == fp for line in lines), f"the attached dataset is the one GetInfo describes over TCP "
                                                    f"({fp[:16]}...)")
        same, differ = 0, []
        for _, s, i, size, shuffle, xd, want, _ in lines:
            order = dict(shuffle=True, seed=SEED, epoch=EPOCH) if shuffle == "1" else {}
            x, y = c.get_batch(s, int(i), int(size), x_dtype=None if xd == "stored" else xd, **order)
            if digest(x, y) == want:
                same += 1
            else:
                differ.append(f"{s}[{i}] size {size} shuffle {shuffle} {xd}")
        check(same == len(lines) and not differ,
              f"{same}/{len(lines)} attached minibatches have the sha256 of GetBatch over TCP ({address})"
              + (f"; differ: {differ}" if differ else ""))
    print(f"attach compare: {'passed' if not check.failed else 'FAILED'}", flush=True)
    return 1 if check.failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="side", required=True)
    at = sub.add_parser("attach", help="in the trainer's container: attach, check, print digests")
    at.add_argument("socket")
    cmp = sub.add_parser("compare", help="on the host: compare the digests with GetBatch over TCP")
    cmp.add_argument("address")
    cmp.add_argument("digests", help="the attach side's output")
    a = p.parse_args()
    if a.side == "attach":
        return attach_side(a.socket)
    return compare_side(a.address, a.digests)


if __name__ == "__main__":
    sys.exit(main())
