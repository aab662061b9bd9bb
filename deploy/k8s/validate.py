#!/usr/bin/env python3
"""Validates the Kubernetes manifests in deploy/k8s, offline.

1. Schema: every full resource (deployment.yaml, service.yaml,
   networkpolicy.yaml, dataset-pvc.yaml), and the Deployment with each
   *-patch.yaml applied (a strategic merge, as `kubectl patch` does; also
   nonroot + tls together), against the Kubernetes
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
3. Access (secure by default): the Deployment, and every patch but
   open-patch.yaml, reads the bearer token from a file
   (MINIBATCHD_AUTH_TOKEN_FILE) in a read-only mount of a non-optional
   volume of the Secret minibatchd-token, readable by the container's uid;
   no token value anywhere (no MINIBATCHD_AUTH_TOKEN env, no Secret or
   secretGenerator shipped); no host network/PID/IPC, no hostPort; every
   mount has its volume; probes carry no token (health is open) and have one
   handler each; tls-patch.yaml points MINIBATCHD_TLS_CERT/KEY into a
   read-only cert Secret mount and probes over TLS with `minibatchd health`;
   open-patch.yaml removes the token requirement cleanly and warns.
   networkpolicy.yaml (in kustomization.yaml) selects the Deployment's pods,
   restricts ingress to gRPC from pods labelled minibatchd-client: "true"
   and to metrics from a selected namespace (no rule without `from` or
   `ports`, no ipBlock), covers every Service port, and allows no egress.
4. The attach variant, daemonset/ (a kustomize Component): an overlay with
   deploy/k8s and the Component renders the DaemonSet, the Service and the
   NetworkPolicy and no Deployment (emulated here; also built with
   `kubectl kustomize` when kubectl is installed, and the two compared);
   daemonset.yaml and trainer-job.yaml against the schemas (the DaemonSet
   with tls-patch.yaml and open-patch.yaml applied too); the DaemonSet
   meets the Deployment's requirements but the replica count, and its
   access rules; its Unix socket (MINIBATCHD_UDS) lies in a writable
   hostPath mount (DirectoryOrCreate) that uid 0 can write, mode without
   access for others, a numeric group the daemon is in (so it may chgrp
   the socket), maxSurge 0 (two daemons cannot share a socket); the
   example trainer mounts the same hostPath read-only (type Directory),
   attaches to the same socket file, has the group, runs non-root without
   capabilities, has no hostIPC or /dev/shm volume, the DaemonSet's
   nodeSelector, and the token from the Secret.

Usage: python deploy/k8s/validate.py [--no-schema]
Needs PyYAML and kubernetes-validate (both pinned in requirements-test.txt);
--no-schema skips step 1 (PyYAML only). Prints `N passed, M failed`.
"""
from __future__ import annotations

import argparse
import copy
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
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
CLIENT_LABEL = ("minibatchd-client", "true")
TOKEN_SECRET = "minibatchd-token"
TLS_SECRET = "minibatchd-tls"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
PROBE_HANDLERS = ("exec", "grpc", "httpGet", "tcpSocket")
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}


def strategic_merge(base, patch, field: str = ""):
    """The subset of a strategic merge patch that these manifests use: maps
    merge (null deletes a key), lists with a merge key merge by it (an item
    with `$patch: delete` removes its match), other lists are replaced."""
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
            if item.get("$patch") == "delete":
                out = [x for x in out if x.get(key) != item.get(key)]
                continue
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


def check_deployment(check: Checks, dep: dict, label: str, *, pinned: bool, tls: bool = False,
                     replicas: int | None = 3) -> None:
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    c = container(dep)
    if replicas is not None:
        check(spec.get("replicas") == replicas, f"{label}: replicas {replicas} (is {spec.get('replicas')})")
    sel = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    check(all(labels.get(k) == v for k, v in sel.items()), f"{label}: selector matches the pod labels")
    env = env_of(c)
    check(env.get("MINIBATCHD_ADDR", "").startswith("0.0.0.0:"), f"{label}: listens on 0.0.0.0 (MINIBATCHD_ADDR)")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(ports.get("grpc") == GRPC_PORT and ports.get("metrics") == METRICS_PORT,
          f"{label}: container ports grpc {GRPC_PORT}, metrics {METRICS_PORT}")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if tls:  # kubelet gRPC probes are plaintext only
            cmd = ((c.get(probe) or {}).get("exec") or {}).get("command") or []
            check(cmd[:2] == ["/usr/local/bin/minibatchd", "health"] and f"127.0.0.1:{GRPC_PORT}" in cmd,
                  f"{label}: {probe} runs `minibatchd health` against 127.0.0.1:{GRPC_PORT} "
                  f"(the BatchService's health, over TLS)")
            continue
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


def secret_file(dep: dict, path: str):
    """The Secret volume file behind `path` in the minibatchd container: (the
    volume, its mount, the Secret key it shows), or None."""
    c = container(dep)
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/") + "/"
        if not path.startswith(mp) or m.get("subPath"):
            continue
        v = vols.get(m["name"]) or {}
        sec = v.get("secret")
        if sec is None:
            return None
        rel = path[len(mp):]
        items = sec.get("items")
        if items is None:
            return v, m, rel
        for it in items:
            if it.get("path") == rel:
                return v, m, it.get("key")
        return None
    return None


def readable(dep: dict, vol: dict, key: str) -> tuple[bool, str]:
    """Whether the container's process can read that Secret file. Secret
    files belong to root (group: fsGroup, if any); with every capability
    dropped, even uid 0 needs the owner bit (no CAP_DAC_OVERRIDE)."""
    pod = dep["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    sc = container(dep).get("securityContext", {})
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    gid = sc.get("runAsGroup", psc.get("runAsGroup"))
    fs_group = psc.get("fsGroup")
    sec = vol["secret"]
    mode = next((it.get("mode") for it in sec.get("items") or [] if it.get("key") == key), None)
    mode = mode if mode is not None else sec.get("defaultMode", 0o644)
    groups = {g for g in (gid, fs_group) if g is not None} | set(psc.get("supplementalGroups", []))
    group = fs_group if fs_group is not None else 0
    ok = bool((uid == 0 and mode & 0o400) or (group in groups and mode & 0o040) or mode & 0o004)
    return ok, f"mode {mode:04o}, uid {uid}"


def check_access(check: Checks, dep: dict, label: str, *, token: bool, tls: bool) -> None:
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    env = {e["name"]: e for e in c.get("env", [])}
    check(not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")),
          f"{label}: no hostNetwork, hostPID or hostIPC")
    check(not any(p.get("hostPort") for p in c.get("ports", [])), f"{label}: no hostPort")
    vols = {v["name"] for v in pod.get("volumes", [])}
    missing = [m["name"] for m in c.get("volumeMounts", []) if m["name"] not in vols]
    check(not missing, f"{label}: every volumeMount has its volume" + (f" (missing: {missing})" if missing else ""))
    check("MINIBATCHD_AUTH_TOKEN" not in env,
          f"{label}: no token in the pod spec (no MINIBATCHD_AUTH_TOKEN env; the file only)")
    tf = (env.get("MINIBATCHD_AUTH_TOKEN_FILE") or {}).get("value")
    if token:
        hit = secret_file(dep, tf) if tf else None
        check(hit is not None, f"{label}: MINIBATCHD_AUTH_TOKEN_FILE ({tf}) is a file of a Secret volume")
        if hit:
            vol, mount, key = hit
            sec = vol["secret"]
            check(sec.get("secretName") == TOKEN_SECRET and key == "token",
                  f"{label}: the token file is key `token` of Secret {TOKEN_SECRET}")
            check(sec.get("optional") in (None, False),
                  f"{label}: the token Secret is not optional (no Secret: the pod does not start, never open)")
            check(mount.get("readOnly") is True, f"{label}: the token is mounted read-only")
            ok, how = readable(dep, vol, key)
            check(ok, f"{label}: the token file is readable by the daemon ({how})")
    else:
        check(tf is None and not any((v.get("secret") or {}).get("secretName") == TOKEN_SECRET
                                     for v in pod.get("volumes", [])),
              f"{label}: OPEN: no token file, no token Secret volume (nothing dangling)")
    for probe in PROBES:
        pr = c.get(probe) or {}
        handlers = [h for h in PROBE_HANDLERS if pr.get(h) is not None]
        check(len(handlers) == 1, f"{label}: {probe} has one handler ({', '.join(handlers) or 'none'})")
        cmd = (pr.get("exec") or {}).get("command") or []
        check(not any(str(a).startswith("--token") for a in cmd) and "MINIBATCHD_TOKEN" not in env,
              f"{label}: {probe} carries no token (gRPC health is open)")
    cert = (env.get("MINIBATCHD_TLS_CERT") or {}).get("value")
    keyp = (env.get("MINIBATCHD_TLS_KEY") or {}).get("value")
    if tls:
        hits = [secret_file(dep, p) if p else None for p in (cert, keyp)]
        check(all(h and h[0]["secret"].get("secretName") == TLS_SECRET and h[1].get("readOnly") is True
                  and h[0]["secret"].get("optional") in (None, False) for h in hits),
              f"{label}: MINIBATCHD_TLS_CERT/KEY ({cert}, {keyp}) lie in a read-only mount of Secret {TLS_SECRET}")
        if all(hits):
            check([h[2] for h in hits] == ["tls.crt", "tls.key"], f"{label}: cert and key are tls.crt and tls.key")
            check(all(readable(dep, h[0], h[2])[0] for h in hits), f"{label}: cert and key readable by the daemon")
        for probe in PROBES:
            cmd = ((c.get(probe) or {}).get("exec") or {}).get("command") or []
            ca = cmd[cmd.index("--tls-ca") + 1] if "--tls-ca" in cmd[:-1] else None
            hit = secret_file(dep, ca) if ca else None
            check(hit is not None and hit[0]["secret"].get("secretName") == TLS_SECRET,
                  f"{label}: {probe} verifies the server with --tls-ca {ca} from Secret {TLS_SECRET}")
        check(bool((env.get("MINIBATCHD_TLS_DOMAIN") or {}).get("value")),
              f"{label}: MINIBATCHD_TLS_DOMAIN set (the name the probes verify)")
    else:
        check(cert is None and keyp is None, f"{label}: no TLS (plaintext gRPC; the kubelet's gRPC probes work)")


def peer_labels(sel: dict | None) -> dict:
    return dict((sel or {}).get("matchLabels") or {})


def check_network_policy(check: Checks, np: dict, dep: dict, svc: dict) -> None:
    label = "networkpolicy.yaml"
    spec = np["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    sel = spec.get("podSelector") or {}
    ml = peer_labels(sel)
    check(bool(ml) and not sel.get("matchExpressions") and all(pod_labels.get(k) == v for k, v in ml.items()),
          f"{label}: podSelector {ml} selects the Deployment's pods (and only by their labels)")
    types = spec.get("policyTypes") or []
    check("Ingress" in types, f"{label}: policyTypes has Ingress (ingress is deny-unless-listed)")
    check("Egress" in types and not spec.get("egress"), f"{label}: no egress allowed (the daemon opens no connections)")
    cports = {p["name"]: p["containerPort"] for p in container(dep).get("ports", [])}
    allowed: dict[int, list] = {}
    rules = spec.get("ingress") or []
    for i, rule in enumerate(rules):
        frm, ports = rule.get("from") or [], rule.get("ports") or []
        check(bool(frm) and bool(ports), f"{label}: ingress rule {i} names its sources and ports "
                                         f"(a missing `from` admits everyone, missing `ports` every port)")
        check(not any("ipBlock" in p for p in frm), f"{label}: ingress rule {i} has no ipBlock")
        for p in ports:
            n = cports.get(p.get("port"), p.get("port"))
            check(p.get("protocol", "TCP") == "TCP" and n in (GRPC_PORT, METRICS_PORT) and not p.get("endPort"),
                  f"{label}: ingress rule {i} opens TCP {n} only (a port the daemon serves)")
            allowed.setdefault(n, []).extend(frm)
    grpc_peers = allowed.get(GRPC_PORT, [])
    check(bool(grpc_peers) and all(
        peer_labels(p.get("podSelector")).get(CLIENT_LABEL[0]) == CLIENT_LABEL[1]
        and not (p.get("podSelector") or {}).get("matchExpressions")
        and (p.get("namespaceSelector") is None or peer_labels(p.get("namespaceSelector")))
        for p in grpc_peers),
        f"{label}: gRPC {GRPC_PORT} only from pods labelled {CLIENT_LABEL[0]}: \"{CLIENT_LABEL[1]}\"")
    metrics_peers = allowed.get(METRICS_PORT, [])
    check(bool(metrics_peers) and all(peer_labels(p.get("namespaceSelector")) for p in metrics_peers),
          f"{label}: metrics {METRICS_PORT} only from a namespace chosen by label "
          f"({[peer_labels(p.get('namespaceSelector')) for p in metrics_peers]})")
    sports = {p.get("targetPort") for p in svc["spec"]["ports"]}
    sports = {cports.get(p, p) for p in sports}
    check(sports <= set(allowed), f"{label}: every Service port ({sorted(sports)}) has an ingress rule")


# --- the attach variant: deploy/k8s/daemonset ------------------------------------

DS_DIR = "daemonset"
# Patches of deployment.yaml that also make sense for the DaemonSet (the
# non-root one does not: a non-root daemon cannot create its socket in the
# root-owned hostPath directory the kubelet creates; README.md).
DS_PATCHES = ("tls-patch.yaml", "open-patch.yaml")


def kustomize_docs(path: Path) -> list[dict]:
    """The objects a kustomization's `resources` list (files, or directories
    with their own kustomization.yaml), as kustomize accumulates them."""
    k = yaml.safe_load((path / "kustomization.yaml").read_text())
    out = []
    for r in k.get("resources", []):
        target = (path / r).resolve()
        if target.is_dir():
            out += kustomize_docs(target)
        else:
            out += [d for d in yaml.safe_load_all(target.read_text()) if d]
    return out


def ident(d: dict) -> tuple[str, str]:
    return d.get("kind", "?"), (d.get("metadata") or {}).get("name", "?")


def render_overlay(component: dict) -> list[dict]:
    """What `resources: [deploy/k8s]` + `components: [deploy/k8s/daemonset]`
    gives: the base's objects, the Component's resources added, the objects
    its `$patch: delete` patches name removed."""
    docs = kustomize_docs(HERE)
    docs += [d for r in component.get("resources", []) for d in yaml.safe_load_all((HERE / DS_DIR / r).read_text())
             if d]
    for p in component.get("patches", []):
        body = yaml.safe_load(p["patch"]) if "patch" in p else load(posixpath.join(DS_DIR, p["path"]))
        if isinstance(body, dict) and body.get("$patch") == "delete":
            docs = [d for d in docs if ident(d) != ident(body)]
    return docs


def kubectl_kustomize() -> tuple[list[dict] | None, str]:
    """The overlay built by `kubectl kustomize` in a scratch directory outside
    deploy/k8s (kustomize refuses an overlay inside its base), or None and why."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None, "kubectl not installed"
    with tempfile.TemporaryDirectory() as tmp:
        rel = os.path.relpath(HERE, tmp)
        Path(tmp, "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n  - {rel}\ncomponents:\n  - {rel}/{DS_DIR}\n")
        try:
            r = subprocess.run([kubectl, "kustomize", tmp], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"kubectl kustomize did not run: {e}"
    if r.returncode != 0:
        return [], r.stderr.strip()[-500:]
    return [d for d in yaml.safe_load_all(r.stdout) if d], ""


def check_attach_daemonset(check: Checks, ds: dict, label: str) -> dict:
    """The DaemonSet's Unix socket: where it is, who may connect. Returns
    {path, dir, host_path, gid, node_selector} for the trainer's checks."""
    pod = ds["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    c = container(ds)
    env = env_of(c)
    sock = env.get("MINIBATCHD_UDS") or ""
    check(sock.startswith("/") and not sock.endswith("/"),
          f"{label}: serves on a Unix socket (MINIBATCHD_UDS {sock!r})")
    sdir = posixpath.dirname(sock)
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"].rstrip("/") == sdir), None)
    hp = (vols.get(mount["name"], {}) if mount else {}).get("hostPath") or {}
    check(bool(hp) and not mount.get("readOnly") and not mount.get("subPath"),
          f"{label}: the socket's directory {sdir} is a writable hostPath mount (node's {hp.get('path')})")
    check(hp.get("type") == "DirectoryOrCreate",
          f"{label}: hostPath type DirectoryOrCreate (the kubelet creates it, root:root 0755; is {hp.get('type')})")
    sc = c.get("securityContext", {})
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    check(uid == 0, f"{label}: runs as uid 0, the owner of the kubelet-made directory, so it can create the "
                    f"socket there without CAP_DAC_OVERRIDE (uid {uid})")
    mode_s = env.get("MINIBATCHD_UDS_MODE") or "660"
    try:
        mode = int(mode_s, 8)
    except ValueError:
        mode = -1
    check(0 <= mode <= 0o777 and mode & 0o007 == 0 and mode & 0o060 == 0o060,
          f"{label}: socket mode {mode_s}: the group may connect, others may not")
    gid_s = env.get("MINIBATCHD_UDS_GROUP") or ""
    gid = int(gid_s) if gid_s.isdigit() else None
    groups = set(psc.get("supplementalGroups", [])) | {g for g in (psc.get("fsGroup"),
                                                                    sc.get("runAsGroup", psc.get("runAsGroup")))
                                                       if g is not None}
    check(gid is not None and gid != 0, f"{label}: the socket's group is a numeric gid, not root's "
                                        f"(MINIBATCHD_UDS_GROUP {gid_s!r}; a name would need /etc/group in the image)")
    check(gid in groups, f"{label}: the daemon is in group {gid} (supplementalGroups), so it may give the socket "
                         f"to it with CAP_CHOWN dropped")
    ma = env.get("MINIBATCHD_MAX_ATTACHED")
    check(ma is None or (ma.isdigit() and int(ma) >= 1), f"{label}: MINIBATCHD_MAX_ATTACHED {ma} >= 1")
    us = ds["spec"].get("updateStrategy") or {}
    surge = str((us.get("rollingUpdate") or {}).get("maxSurge", 0))
    check(us.get("type", "RollingUpdate") == "RollingUpdate" and surge in ("0", "0%"),
          f"{label}: rolling update with maxSurge 0: the old pod frees the socket before the new one binds it "
          f"(maxSurge {surge})")
    check(not any(p.get("hostPort") for p in c.get("ports", [])) and not pod.get("hostNetwork"),
          f"{label}: attach needs no host network or hostPort (the socket is a file)")
    return {"path": sock, "dir": sdir, "host_path": hp.get("path"), "gid": gid,
            "node_selector": pod.get("nodeSelector") or {}}


def check_attach_trainer(check: Checks, job: dict, daemon: dict, label: str) -> None:
    pod = job["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    cs = pod.get("containers", [])
    check(len(cs) == 1, f"{label}: one container")
    c = cs[0] if cs else {}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = [(m, (vols.get(m["name"]) or {}).get("hostPath") or {}) for m in c.get("volumeMounts", [])]
    mounts = [(m, hp) for m, hp in mounts if hp.get("path") == daemon["host_path"]]
    check(len(mounts) == 1, f"{label}: mounts the daemon's hostPath {daemon['host_path']}")
    if not mounts:
        return
    m, hp = mounts[0]
    check(m.get("readOnly") is True, f"{label}: read-only (connecting to a socket writes nothing to the filesystem)")
    check(hp.get("type") in ("Directory", "DirectoryOrCreate"), f"{label}: hostPath type {hp.get('type')}")
    args = [str(x) for x in (c.get("command") or []) + (c.get("args") or [])]
    target = args[args.index("--attach") + 1] if "--attach" in args[:-1] else ""
    want = posixpath.join(m["mountPath"], posixpath.basename(daemon["path"]))
    check(target in (want, "unix://" + want),
          f"{label}: attaches to {target or '(no --attach)'}, the daemon's socket as mounted here ({want})")
    check(daemon["gid"] in psc.get("supplementalGroups", []),
          f"{label}: in the socket's group {daemon['gid']} (supplementalGroups), so its uid may connect")
    sc = c.get("securityContext", {})
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True and isinstance(uid, int) and uid > 0,
          f"{label}: runs as non-root (uid {uid}): the group, not root, lets it in")
    check((sc.get("capabilities") or {}).get("drop") == ["ALL"] and not (sc.get("capabilities") or {}).get("add")
          and sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged"),
          f"{label}: no capabilities, no privilege escalation")
    shm = [x["mountPath"] for x in c.get("volumeMounts", [])
           if ((vols.get(x["name"]) or {}).get("emptyDir") or {}).get("medium") == "Memory"]
    check(not any(pod.get(k) for k in ("hostIPC", "hostNetwork", "hostPID")) and not shm,
          f"{label}: no hostIPC/hostNetwork/hostPID and no memory emptyDir for /dev/shm (attach needs none)")
    ns = pod.get("nodeSelector") or {}
    check(all(ns.get(k) == v for k, v in daemon["node_selector"].items()),
          f"{label}: nodeSelector {ns} includes the DaemonSet's {daemon['node_selector']} (same node as a daemon)")
    env = {e["name"]: e for e in c.get("env", [])}
    ref = ((env.get("MINIBATCHD_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
    check(ref.get("name") == TOKEN_SECRET and ref.get("key") == "token"
          and "value" not in env.get("MINIBATCHD_TOKEN", {}),
          f"{label}: the bearer token (attach asks for it too) from Secret {TOKEN_SECRET}, key token")


def check_daemonset(check: Checks, kust: dict, dep: dict, svc: dict, np: dict, patches: dict,
                    validate_schema) -> None:
    comp_path = HERE / DS_DIR / "kustomization.yaml"
    check(comp_path.is_file(), f"{DS_DIR}/kustomization.yaml exists")
    if not comp_path.is_file():
        return
    comp = load(f"{DS_DIR}/kustomization.yaml")
    check(comp.get("kind") == "Component" and comp.get("apiVersion") == "kustomize.config.k8s.io/v1alpha1",
          f"{DS_DIR}/kustomization.yaml: a kustomize Component (an overlay cannot live inside its base)")
    for r in comp.get("resources", []):
        check((HERE / DS_DIR / r).is_file(), f"{DS_DIR}/kustomization.yaml: resource {r} exists")
    ds = load(f"{DS_DIR}/daemonset.yaml")
    job = load(f"{DS_DIR}/trainer-job.yaml")
    check(ds.get("kind") == "DaemonSet", f"{DS_DIR}/daemonset.yaml: a DaemonSet (one daemon per node)")

    rendered = render_overlay(comp)
    ids = sorted(ident(d) for d in rendered)
    want = sorted([ident(ds), ident(svc), ident(np)])
    check(ids == want, f"{DS_DIR}: deploy/k8s + the Component renders {ids} (want {want}: no Deployment)")
    built, why = kubectl_kustomize()
    if built is None:
        print(f"skip {DS_DIR}: `kubectl kustomize` of the overlay ({why}); emulated above")
    else:
        check(sorted(ident(d) for d in built) == ids and next((d for d in built if ident(d) == ident(ds)), None) == ds,
              f"{DS_DIR}: `kubectl kustomize` of the overlay gives the same objects, the DaemonSet unchanged"
              + (f" ({why})" if why else ""))

    # As kustomize applies them with `target: {kind: DaemonSet, name: minibatchd}`:
    # the patch's spec only (its kind and name are the Deployment's).
    ds_patched = {name: dict(ds, spec=strategic_merge(ds["spec"], patches[name]["spec"], "spec"))
                  for name in DS_PATCHES if name in patches}
    if validate_schema:
        validate_schema([(f"{DS_DIR}/daemonset.yaml", ds), (f"{DS_DIR}/trainer-job.yaml", job)]
                        + [(f"{DS_DIR}/daemonset.yaml + {n}", d) for n, d in ds_patched.items()])

    label = f"{DS_DIR}/daemonset.yaml"
    check_deployment(check, ds, label, pinned=True, replicas=None)
    check_access(check, ds, label, token=True, tls=False)
    for name, d in ds_patched.items():
        check_access(check, d, f"{label} + {name}", token=name != "open-patch.yaml", tls=name == "tls-patch.yaml")
    if "tls-patch.yaml" in ds_patched:
        check_deployment(check, ds_patched["tls-patch.yaml"], f"{label} + tls-patch.yaml", pinned=True, tls=True,
                         replicas=None)
    labels = ds["spec"]["template"]["metadata"]["labels"]
    check(all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()),
          f"{label}: the Service's selector matches its pods")
    check_network_policy(check, np, ds, svc)
    daemon = check_attach_daemonset(check, ds, label)
    check_attach_trainer(check, job, daemon, f"{DS_DIR}/trainer-job.yaml")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-schema", action="store_true", help="skip the schema validation (PyYAML checks only)")
    a = ap.parse_args()
    check = Checks()

    kust = load("kustomization.yaml")
    for r in kust.get("resources", []):
        check((HERE / r).is_file(), f"kustomization.yaml: resource {r} exists")

    check("networkpolicy.yaml" in kust.get("resources", []),
          "kustomization.yaml: applies networkpolicy.yaml with the Deployment")
    check(not kust.get("secretGenerator"), "kustomization.yaml: no secretGenerator (no token value shipped)")
    shipped_secrets = [f"{f.relative_to(HERE)}: {d.get('metadata', {}).get('name')}"
                       for f in sorted(HERE.rglob("*.yaml"))
                       for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict) and d.get("kind") == "Secret"]
    check(not shipped_secrets,
          f"no Secret shipped in deploy/k8s (the token is created per cluster) {shipped_secrets or ''}")

    dep = load("deployment.yaml")
    svc = load("service.yaml")
    np = load("networkpolicy.yaml")
    pvc = load("dataset-pvc.yaml")
    patches = {p.name: load(p.name) for p in sorted(HERE.glob("*-patch.yaml"))}
    for name, p in patches.items():
        check(p.get("kind") == "Deployment" and p["metadata"]["name"] == dep["metadata"]["name"],
              f"{name}: patches Deployment {dep['metadata']['name']}")
    patched = {name: strategic_merge(dep, p) for name, p in patches.items()}
    combos = {}
    if {"nonroot-patch.yaml", "tls-patch.yaml"} <= set(patches):
        combos["nonroot-patch.yaml + tls-patch.yaml"] = strategic_merge(
            patched["nonroot-patch.yaml"], patches["tls-patch.yaml"])

    validate_schema = None  # (name, object) pairs -> one check each per schema version
    if not a.no_schema:
        try:
            import kubernetes_validate as kv
        except ImportError:
            print("error: kubernetes-validate is not installed (pip install -r requirements-test.txt), "
                  "or pass --no-schema", file=sys.stderr)
            return 2

        def validate_all(targets):
            for version in SCHEMA_VERSIONS:
                v = version or kv.latest_version()
                for name, doc in targets:
                    try:
                        kv.validate(doc, v, strict=True)
                        check(True, f"schema {v} (strict): {name}")
                    except kv.ValidationError as e:
                        where = "/".join(str(p) for p in e.path)
                        check(False, f"schema {v} (strict): {name}: {where}: {e.message}")

        validate_schema = validate_all
        targets = [("deployment.yaml", dep), ("service.yaml", svc), ("networkpolicy.yaml", np),
                   ("dataset-pvc.yaml", pvc)]
        targets += [(f"deployment.yaml + {name}", d) for name, d in (patched | combos).items()]
        validate_schema(targets)

    check_deployment(check, dep, "deployment.yaml", pinned=True)
    if "nonroot-patch.yaml" in patched:
        check_deployment(check, patched["nonroot-patch.yaml"], "+ nonroot-patch.yaml", pinned=False)

    # Access: token, TLS, the open variant, the NetworkPolicy.
    check_access(check, dep, "deployment.yaml", token=True, tls=False)
    for name, d in (patched | combos).items():
        check_access(check, d, f"+ {name}", token=name != "open-patch.yaml", tls="tls-patch.yaml" in name)
    if "tls-patch.yaml" in patched:
        check_deployment(check, patched["tls-patch.yaml"], "+ tls-patch.yaml", pinned=True, tls=True)
    check("open-patch.yaml" in patches, "open-patch.yaml: the documented way to open it exists")
    if "open-patch.yaml" in patches:
        check("WARNING" in (HERE / "open-patch.yaml").read_text(), "open-patch.yaml: carries a WARNING")
    check_network_policy(check, np, dep, svc)

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

    check_daemonset(check, kust, dep, svc, np, patches, validate_schema)

    print(f"k8s-manifests: {check.passed} passed, {check.failed} failed")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
