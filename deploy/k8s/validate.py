#!/usr/bin/env python3
"""Validates the Kubernetes manifests in deploy/k8s, offline.

1. Schema: every full resource (deployment.yaml, service.yaml,
   dataset-pvc.yaml), and the Deployment with each *-patch.yaml applied
   (a strategic merge, as `kubectl patch` does), against the Kubernetes
   OpenAPI schemas that the PyPI package kubernetes-validate ships (no
   download), strictly (unknown fields are errors), for Kubernetes 1.27 (the
   first with GA gRPC probes) and the newest version the package knows.
2. This project's requirements, read with PyYAML: 3 replicas; gRPC readiness,
   liveness and startup probes on 50051 for the BatchService; memory requests
   >= 1.2 x the full MNIST's tensor bytes + the daemon, and >= the measured
   load peak; limits above requests; CAP_IPC_LOCK added with everything else
   dropped (and the non-root patch really non-root, without it); a headless
   Service whose selector and ports match the pods; the daemon listening on
   0.0.0.0; a termination grace longer than the daemon's drain; the dataset
   patch mounting the PVC that dataset-pvc.yaml declares.

Usage: python deploy/k8s/validate.py [--no-schema]
Needs PyYAML and kubernetes-validate (both pinned in requirements-test.txt);
--no-schema skips step 1 (PyYAML only). Prints `N passed, M failed`.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# Full MNIST (mnist.pkl.gz): float32 x [n, 784] and int64 y [n] for
# train / valid / test = 50,000 / 10,000 / 10,000 examples.
FULL_MNIST_TENSOR_BYTES = sum(n * 784 * 4 + n * 8 for n in (50_000, 10_000, 10_000))
assert FULL_MNIST_TENSOR_BYTES == 220_080_000
MIB = 1024 * 1024
# Measured with target/release/minibatchd on a gzip'd pickle of that size:
# RSS beyond the locked dataset while serving 16 streams (~18 MiB, rounded up),
# and the peak RSS while loading (VmHWM 314,488 kB).
DAEMON_OVERHEAD_BYTES = 20 * MIB
LOAD_PEAK_BYTES = 314_488 * 1024
SCHEMA_VERSIONS = ("1.27.0", None)  # None: the newest the package knows
GRPC_PORT, METRICS_PORT = 50051, 50052
HEALTH_SERVICE = "minibatch.v1.BatchService"
DRAIN_SECS_DEFAULT = 30

# Strategic merge keys of the lists the patches touch (as in the Kubernetes API).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}


def strategic_merge(base, patch, field: str = ""):
    """The subset of a strategic merge patch that these manifests use: maps
    merge (null deletes a key), lists with a merge key merge by it, other
    lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            for i, have in enumerate(out):
                if have.get(key) == item.get(key):
                    out[i] = strategic_merge(have, item, field)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def quantity(q) -> float:
    """A Kubernetes resource quantity in bytes (or cores for plain numbers)."""
    m = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|Ti|k|M|G|T|m)?", str(q))
    if not m:
        raise ValueError(f"not a quantity: {q!r}")
    mult = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9,
            "T": 1e12, "m": 1e-3}[m.group(2)]
    return float(m.group(1)) * mult


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def __call__(self, ok: bool, what: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed += 1


def load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((HERE / name).read_text()) if d is not None]
    if len(docs) != 1:
        raise SystemExit(f"{name}: expected one document, found {len(docs)}")
    return docs[0]


def container(dep: dict) -> dict:
    cs = dep["spec"]["template"]["spec"]["containers"]
    return next(c for c in cs if c["name"] == "minibatchd")


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def check_deployment(check: Checks, dep: dict, label: str, *, pinned: bool) -> None:
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    c = container(dep)
    check(spec.get("replicas") == 3, f"{label}: replicas 3 (is {spec.get('replicas')})")
    sel = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    check(all(labels.get(k) == v for k, v in sel.items()), f"{label}: selector matches the pod labels")
    env = env_of(c)
    check(env.get("MINIBATCHD_ADDR", "").startswith("0.0.0.0:"), f"{label}: listens on 0.0.0.0 (MINIBATCHD_ADDR)")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(ports.get("grpc") == GRPC_PORT and ports.get("metrics") == METRICS_PORT,
          f"{label}: container ports grpc {GRPC_PORT}, metrics {METRICS_PORT}")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        g = (c.get(probe) or {}).get("grpc") or {}
        check(g.get("port") == GRPC_PORT and g.get("service") == HEALTH_SERVICE,
              f"{label}: {probe} is a gRPC probe of {HEALTH_SERVICE} on {GRPC_PORT}")
    req = quantity(c["resources"]["requests"]["memory"])
    lim = quantity(c["resources"]["limits"]["memory"])
    need = 1.2 * FULL_MNIST_TENSOR_BYTES + DAEMON_OVERHEAD_BYTES
    check(req >= need, f"{label}: memory request {req / MIB:.0f} MiB >= 1.2 x {FULL_MNIST_TENSOR_BYTES:,} B "
                       f"+ {DAEMON_OVERHEAD_BYTES // MIB} MiB = {need / MIB:.0f} MiB")
    check(req >= LOAD_PEAK_BYTES, f"{label}: memory request >= the load peak {LOAD_PEAK_BYTES / MIB:.0f} MiB")
    check(lim > req, f"{label}: memory limit {lim / MIB:.0f} MiB > request")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    drain = int(env.get("MINIBATCHD_SHUTDOWN_GRACE_SECS") or DRAIN_SECS_DEFAULT)
    check(grace > drain, f"{label}: terminationGracePeriodSeconds {grace} > the daemon's drain {drain} s")
    sc = c.get("securityContext", {})
    caps = sc.get("capabilities", {})
    check(caps.get("drop") == ["ALL"], f"{label}: every capability dropped")
    check(sc.get("allowPrivilegeEscalation") is False and sc.get("privileged") in (None, False),
          f"{label}: no privilege escalation, not privileged")
    check(sc.get("readOnlyRootFilesystem") is True, f"{label}: read-only root filesystem")
    uid = sc.get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
    if pinned:
        check(caps.get("add") == ["IPC_LOCK"], f"{label}: adds CAP_IPC_LOCK only (to pin the dataset)")
        check(uid == 0, f"{label}: uid 0, as capabilities reach root only")
    else:
        nonroot = sc.get("runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot"))
        check(nonroot is True and isinstance(uid, int) and uid > 0, f"{label}: runs as non-root (uid {uid})")
        check(not caps.get("add"), f"{label}: adds no capability (restricted Pod Security Standard)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-schema", action="store_true", help="skip the schema validation (PyYAML checks only)")
    a = ap.parse_args()
    check = Checks()

    kust = load("kustomization.yaml")
    for r in kust.get("resources", []):
        check((HERE / r).is_file(), f"kustomization.yaml: resource {r} exists")

    dep = load("deployment.yaml")
    svc = load("service.yaml")
    pvc = load("dataset-pvc.yaml")
    patches = {p.name: load(p.name) for p in sorted(HERE.glob("*-patch.yaml"))}
    for name, p in patches.items():
        check(p.get("kind") == "Deployment" and p["metadata"]["name"] == dep["metadata"]["name"],
              f"{name}: patches Deployment {dep['metadata']['name']}")
    patched = {name: strategic_merge(dep, p) for name, p in patches.items()}

    if not a.no_schema:
        try:
            import kubernetes_validate as kv
        except ImportError:
            print("error: kubernetes-validate is not installed (pip install -r requirements-test.txt), "
                  "or pass --no-schema", file=sys.stderr)
            return 2
        targets = [("deployment.yaml", dep), ("service.yaml", svc), ("dataset-pvc.yaml", pvc)]
        targets += [(f"deployment.yaml + {name}", d) for name, d in patched.items()]
        for version in SCHEMA_VERSIONS:
            v = version or kv.latest_version()
            for name, doc in targets:
                try:
                    kv.validate(doc, v, strict=True)
                    check(True, f"schema {v} (strict): {name}")
                except kv.ValidationError as e:
                    where = "/".join(str(p) for p in e.path)
                    check(False, f"schema {v} (strict): {name}: {where}: {e.message}")

    check_deployment(check, dep, "deployment.yaml", pinned=True)
    if "nonroot-patch.yaml" in patched:
        check_deployment(check, patched["nonroot-patch.yaml"], "+ nonroot-patch.yaml", pinned=False)

    # The headless Service.
    sspec = svc["spec"]
    check(sspec.get("clusterIP") == "None", "service.yaml: headless (clusterIP: None), so DNS lists every pod")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    check(all(labels.get(k) == v for k, v in sspec["selector"].items()), "service.yaml: selector matches the pods")
    cports = {p["name"]: p["containerPort"] for p in container(dep)["ports"]}
    sports = {p["port"]: p.get("targetPort") for p in sspec["ports"]}
    check(sports.get(GRPC_PORT) in ("grpc", GRPC_PORT) and "grpc" in cports,
          f"service.yaml: port {GRPC_PORT} targets the container's grpc port")
    check(not sspec.get("publishNotReadyAddresses", False), "service.yaml: not-ready (draining) pods leave DNS")

    # The dataset patch mounts the PVC and points MINIBATCHD_DATA into it.
    if "dataset-patch.yaml" in patched:
        d = patched["dataset-patch.yaml"]
        c = container(d)
        env = env_of(c)
        mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
        vols = {v["name"]: v for v in d["spec"]["template"]["spec"].get("volumes", [])}
        ok = False
        for name, m in mounts.items():
            claim = (vols.get(name, {}).get("persistentVolumeClaim") or {}).get("claimName")
            if claim == pvc["metadata"]["name"] and str(env.get("MINIBATCHD_DATA", "")).startswith(
                    m["mountPath"].rstrip("/") + "/"):
                ok = m.get("readOnly") is True
        check(ok, "dataset-patch.yaml: MINIBATCHD_DATA lies in a read-only mount of the PVC in dataset-pvc.yaml")

    print(f"k8s-manifests: {check.passed} passed, {check.failed} failed")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
