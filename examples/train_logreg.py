#!/usr/bin/env python3
"""Logistic regression on MNIST by minibatch SGD, as in the deeplearning.net
tutorial (logistic_sgd.py), in numpy, with every minibatch from minibatchd.

    # a daemon with the bundled sample (or --data mnist.pkl.gz):
    target/debug/minibatchd serve --addr 127.0.0.1:50051 --uds /tmp/minibatchd.sock &
    python examples/train_logreg.py --server 127.0.0.1:50051
    # the same host: map the daemon's own copy of the dataset (README "Attach"):
    python examples/train_logreg.py --attach /tmp/minibatchd.sock
    # the same training on arrays loaded here, for comparison:
    python examples/train_logreg.py --local data/mnist-sample.pkl.gz

As in the tutorial: W [784, 10] and b [10] start at zero; the cost is the mean
negative log-likelihood of softmax(x W + b); plain SGD with learning rate 0.13
on minibatches of 600 in file order; each set is cut into n // 600 whole
minibatches (the tutorial's `n_train_batches = n // batch_size`, so a partial
last minibatch is never used); the validation error is checked every
`validation_frequency = min(n_train_batches, patience // 2)` iterations (once
per epoch here), and when it improves the test error of that model is
measured; patience 5,000 iterations, doubled (iter * 2) on an improvement
better than 0.995; training stops when patience runs out or after --epochs.

The math is float32 throughout and the minibatches come in the same order
either way, so --server and --local end with bit-identical weights
(tests/python/test_client.py checks it). --shuffle uses the server's
documented order (minibatch_client.permutation), locally too.

--attach SOCKET maps the dataset the daemon holds (`serve --uds SOCKET`, same
host or a container sharing the socket's volume): no copy of it in this
process, in-order minibatches are read-only views of the daemon's memory,
shuffled ones are gathered here in the same documented order. It checks the
sha256 of every tensor first (Attachment.verify()).
"""
from __future__ import annotations

import argparse
import gzip
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

try:
    import minibatch_client
except ImportError:  # running from a checkout without `pip install ./clients/python`
    sys.path.insert(0, str(ROOT / "clients" / "python"))
    import minibatch_client

SETS = ("train", "valid", "test")


class LocalData:
    """Minibatches cut here from arrays loaded with pickle (the tutorial's way)."""

    def __init__(self, path: str):
        with gzip.open(path, "rb") as f:
            sets = pickle.load(f, encoding="latin1")
        self.sets = {name: (np.asarray(x), np.asarray(y)) for name, (x, y) in zip(SETS, sets)}

    def examples(self, name: str) -> int:
        return len(self.sets[name][1])

    def minibatches(self, name: str, size: int, shuffle: bool, seed: int, epoch: int):
        x, y = self.sets[name]
        n = len(y)
        order = minibatch_client.permutation(n, seed, epoch) if shuffle else None
        for i in range(n // size):  # whole minibatches only, as in the tutorial
            if order is None:
                yield x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]
            else:
                idx = order[i * size:(i + 1) * size]
                yield x[idx], y[idx]


class ServerData:
    """Minibatches from minibatchd, one StreamBatches call per pass over a set."""

    def __init__(self, servers: list[str], x_dtype: str | None, prefetch: int, **credentials):
        self.client = minibatch_client.Client(servers, **credentials)
        self.info = self.client.info()
        self.x_dtype = x_dtype
        self.prefetch = prefetch

    def examples(self, name: str) -> int:
        return self.info.sets[name].examples

    def minibatches(self, name: str, size: int, shuffle: bool, seed: int, epoch: int):
        # drop_last: the tutorial's n // batch_size whole minibatches.
        # decode: uint8/float16/bfloat16 on the wire come back as the exact float32.
        with self.client.epoch(name, size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=True,
                               x_dtype=self.x_dtype, decode=True, prefetch=self.prefetch) as it:
            yield from it


class AttachedData:
    """Minibatches mapped from the daemon's own memory: attach over its Unix
    socket (same host; deploy/docker-compose.yml shares it through a volume)."""

    def __init__(self, socket_path: str, x_dtype: str | None, token: str | None):
        target = socket_path if socket_path.startswith("unix:") else "unix://" + os.path.abspath(socket_path)
        self.client = minibatch_client.Client(target, token=token)
        # x_dtype="uint8": the daemon's uint8 mirror of x, decoded here to
        # the exact float32 (as --server --x-dtype uint8 does).
        self.attachment = self.client.attach(x_dtype=x_dtype)
        self.decode = x_dtype is not None
        self.attachment.verify()  # sha256 of every tensor, against the daemon's

    def examples(self, name: str) -> int:
        return self.attachment.sets[name].examples

    def minibatches(self, name: str, size: int, shuffle: bool, seed: int, epoch: int):
        a = self.attachment
        if not shuffle:
            # In file order a minibatch is a slice: read-only views, no copy.
            for i in range(self.examples(name) // size):  # whole minibatches, as the tutorial
                yield a.batch(name, i, size, decode=self.decode)
        else:
            yield from a.epoch(name, size, shuffle=True, seed=seed, epoch=epoch, drop_last=True,
                               decode=self.decode)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class LogisticRegression:
    def __init__(self, n_in: int = 784, n_out: int = 10):
        self.W = np.zeros((n_in, n_out), dtype=np.float32)
        self.b = np.zeros(n_out, dtype=np.float32)

    def p_y_given_x(self, x: np.ndarray) -> np.ndarray:
        return softmax(x @ self.W + self.b)

    def errors(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(np.argmax(self.p_y_given_x(x), axis=1) != y))

    def sgd_step(self, x: np.ndarray, y: np.ndarray, lr: np.float32) -> float:
        """One step on the mean negative log-likelihood; returns the cost."""
        n = x.shape[0]
        rows = np.arange(n)
        p = self.p_y_given_x(x)
        cost = float(-np.mean(np.log(p[rows, y])))
        g = p  # d cost / d (x W + b) = (p - onehot(y)) / n
        g[rows, y] -= np.float32(1)
        g /= np.float32(n)
        self.W -= lr * (x.T @ g)
        self.b -= lr * g.sum(axis=0)
        return cost


def mean_error(model: LogisticRegression, data, name: str, size: int) -> float:
    # The tutorial's mean over minibatches of each minibatch's error rate.
    errs = [model.errors(x, y) for x, y in data.minibatches(name, size, False, 0, 0)]
    return float(np.mean(errs))


def train(data, *, epochs: int = 20, batch_size: int = 600, learning_rate: float = 0.13, patience: int = 5000,
          patience_increase: int = 2, improvement_threshold: float = 0.995, shuffle: bool = False, seed: int = 0,
          log=print) -> dict:
    n_train_batches = data.examples("train") // batch_size
    if n_train_batches == 0:
        raise SystemExit(f"the train set has fewer than {batch_size} examples")
    lr = np.float32(learning_rate)
    model = LogisticRegression()
    validation_frequency = min(n_train_batches, patience // 2)
    best_validation_loss = np.inf
    best_iter = 0
    test_score = 0.0
    best = (model.W.copy(), model.b.copy())
    start = time.perf_counter()
    done_looping = False
    epoch = 0
    history = []
    log(f"... training the model: {n_train_batches} minibatches of {batch_size} per epoch")
    while epoch < epochs and not done_looping:
        epoch += 1
        costs = []
        for minibatch_index, (x, y) in enumerate(
                data.minibatches("train", batch_size, shuffle, seed, epoch - 1)):
            costs.append(model.sgd_step(x, y, lr))
            it = (epoch - 1) * n_train_batches + minibatch_index
            if (it + 1) % validation_frequency == 0:
                this_validation_loss = mean_error(model, data, "valid", batch_size)
                log(f"epoch {epoch}, minibatch {minibatch_index + 1}/{n_train_batches}, "
                    f"validation error {this_validation_loss * 100.:f} %")
                if this_validation_loss < best_validation_loss:
                    if this_validation_loss < best_validation_loss * improvement_threshold:
                        patience = max(patience, it * patience_increase)
                    best_validation_loss = this_validation_loss
                    best_iter = it
                    test_score = mean_error(model, data, "test", batch_size)
                    best = (model.W.copy(), model.b.copy())
                    log(f"     epoch {epoch}, minibatch {minibatch_index + 1}/{n_train_batches}, "
                        f"test error of best model {test_score * 100.:f} %")
                history.append((epoch, float(np.mean(costs)), this_validation_loss, test_score))
            if patience <= it:
                done_looping = True
                break
    elapsed = time.perf_counter() - start
    log(f"Optimization complete with best validation score of {best_validation_loss * 100.:f} %, "
        f"with test performance {test_score * 100.:f} %")
    log(f"The code ran for {epoch} epochs, with {epoch / max(elapsed, 1e-9):f} epochs/sec")
    return {
        "W": model.W, "b": model.b, "best_W": best[0], "best_b": best[1],
        "best_validation_error": float(best_validation_loss), "test_error": float(test_score),
        "best_iter": best_iter, "epochs": epoch, "seconds": elapsed, "history": np.array(history),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", help="minibatchd address(es), comma-separated for replicas")
    src.add_argument("--attach", metavar="SOCKET",
                     help="map the dataset of the daemon serving on this Unix socket (serve --uds; same host)")
    src.add_argument("--local", metavar="PATH", help="train on mnist.pkl.gz-style arrays loaded here")
    ap.add_argument("--epochs", type=int, default=20, help="at most this many epochs (tutorial: 1000)")
    ap.add_argument("--batch-size", type=int, default=600)
    ap.add_argument("--learning-rate", type=float, default=0.13)
    ap.add_argument("--patience", type=int, default=5000, help="look at this many minibatches at least")
    ap.add_argument("--shuffle", action="store_true", help="reshuffle the train set every epoch (server order)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--x-dtype", choices=["float32", "uint8", "float16", "bfloat16"],
                    help="--server: wire dtype of x; --attach: uint8 only, the daemon's uint8 mirror "
                         "(decoded to the exact float32 here)")
    ap.add_argument("--prefetch", type=int, default=2, help="--server only: minibatches fetched ahead")
    env = os.environ.get
    ap.add_argument("--token", default=env("MINIBATCHD_TOKEN"),
                    help="--server, --attach: bearer token, if the server asks for one (env MINIBATCHD_TOKEN)")
    ap.add_argument("--token-file", default=env("MINIBATCHD_TOKEN_FILE"),
                    help="--server, --attach: read the bearer token from this file (env MINIBATCHD_TOKEN_FILE)")
    ap.add_argument("--tls-ca", default=env("MINIBATCHD_TLS_CA"),
                    help="--server only: PEM CA of the server's certificate; turns TLS on (env MINIBATCHD_TLS_CA)")
    ap.add_argument("--tls-client-cert", default=env("MINIBATCHD_TLS_CLIENT_CERT"),
                    help="--server only: PEM client certificate, for mutual TLS (env MINIBATCHD_TLS_CLIENT_CERT)")
    ap.add_argument("--tls-client-key", default=env("MINIBATCHD_TLS_CLIENT_KEY"),
                    help="--server only: its PEM key (env MINIBATCHD_TLS_CLIENT_KEY)")
    ap.add_argument("--tls-domain", default=env("MINIBATCHD_TLS_DOMAIN"),
                    help="--server only: name to verify in the server certificate (env MINIBATCHD_TLS_DOMAIN)")
    ap.add_argument("--save", metavar="NPZ", help="write W, b, best_W, best_b and the errors here")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.local and a.x_dtype:
        ap.error("--x-dtype applies to --server and --attach only")
    if a.attach and a.x_dtype not in (None, "float32", "uint8"):
        ap.error("--attach maps what the daemon holds: x as stored, or its uint8 mirror (--x-dtype uint8)")
    if a.token_file:
        with open(a.token_file) as f:
            a.token = f.read().strip()
    if a.local:
        data = LocalData(a.local)
    elif a.attach:
        data = AttachedData(a.attach, "uint8" if a.x_dtype == "uint8" else None, a.token)
    else:
        data = ServerData(a.server.split(","), a.x_dtype, a.prefetch, token=a.token, tls_ca=a.tls_ca,
                          tls_cert=a.tls_client_cert, tls_key=a.tls_client_key, tls_domain=a.tls_domain)
    log = (lambda *_: None) if a.quiet else print
    if isinstance(data, ServerData):
        log(f"... minibatches from {', '.join(data.client.addresses)} over the {data.client.transport} transport")
    elif isinstance(data, AttachedData):
        at = data.attachment
        log(f"... attached to {at.address}: dataset {at.fingerprint[:16]}..., generation {at.generation}, "
            f"sets {', '.join(f'{n} {s.examples}' for n, s in at.sets.items())}; "
            f"verified (sha256 of every tensor); minibatches mapped from the daemon's memory")
    r = train(data, epochs=a.epochs, batch_size=a.batch_size, learning_rate=a.learning_rate, patience=a.patience,
              shuffle=a.shuffle, seed=a.seed, log=log)
    if a.save:
        np.savez(a.save, **r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
