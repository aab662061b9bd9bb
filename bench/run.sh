#!/usr/bin/env bash
# The serving benchmark of issue 7, in one command (see bench/README.md):
#
#   bench/run.sh [--quick] [--file mnist.pkl.gz] [harness options...]
#
# Full run: bench/harness.py on the full-size file (made from the bundled
# digits unless --file is given), then bench/attach.py (the attach tier),
# then bench/load.py --runs 5 (load time).
# --quick (CI): a small file and short runs, proves the harness works in
# under 2 minutes and asserts nothing about speed.
#
# Uses .venv (scripts/test.sh makes it) and installs what the harness needs
# into it when missing: pyarrow (pinned in requirements-test.txt). A full run
# also installs iperf3 from Debian's packages when it is missing and this is
# root; without it the harness measures loopback TCP with Python sockets and
# says so. The minibatchd binary: $MINIBATCHD, else target/release, else
# target/debug (the table says so when it is a debug build).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
for arg in "$@"; do [ "$arg" = "--quick" ] && quick=1; done

py=.venv/bin/python
[ -x "$py" ] || py=python3
if ! "$py" -c 'import pyarrow.flight' 2>/dev/null; then
  pin=$(grep -E '^pyarrow==' requirements-test.txt || echo pyarrow)
  echo "installing $pin into $("$py" -c 'import sys; print(sys.prefix)')" >&2
  "$py" -m pip install -q --disable-pip-version-check "$pin"
fi
if [ "$quick" = 0 ] && ! command -v iperf3 >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing iperf3 (apt-get)" >&2
  apt-get install -y -q iperf3 >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q iperf3 >/dev/null 2>&1; } || \
    echo "iperf3 could not be installed: loopback TCP will be measured with Python sockets" >&2
fi

mkdir -p bench/out
# The harness stops every process it starts; this trap is for the case where
# the harness itself dies: it stops the harness and then each process listed
# in bench/out/.pids that is still ours (a child of this run).
harness=""
on_exit() {
  if [ -n "$harness" ] && kill -0 "$harness" 2>/dev/null; then
    kill -TERM "$harness" 2>/dev/null || true
    wait "$harness" 2>/dev/null || true
  fi
  if [ -f bench/out/.pids ]; then
    while read -r pid; do
      # only processes still running from this checkout's bench (pids can be reused)
      if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -e minibatchd -e bench/ -e iperf3; then
        kill -TERM "$pid" 2>/dev/null || true
      fi
    done <bench/out/.pids
    rm -f bench/out/.pids
  fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

"$py" bench/harness.py "$@" &
harness=$!
wait "$harness"
harness=""

# The attach tier (issue 12): same-host trainers mapping the daemon's
# memory against the same trainers over loopback gRPC.
attach_args=()
prev=""
for arg in "$@"; do
  case "$arg" in --quick) attach_args+=(--quick) ;; esac
  [ "$prev" = "--file" ] && attach_args+=(--file "$arg")
  prev="$arg"
done
out=bench/out
[ "$quick" = 1 ] && out=bench/out/quick
mkdir -p "$out"
"$py" bench/attach.py "${attach_args[@]}" --json "$out/attach.json" | tee "$out/attach.txt"

if [ "$quick" = 0 ]; then
  file=""
  prev=""
  for arg in "$@"; do [ "$prev" = "--file" ] && file="$arg"; prev="$arg"; done
  echo "load time: bench/load.py --runs 5" >&2
  bin=${MINIBATCHD:-target/release/minibatchd}
  [ -x "$bin" ] || bin=target/debug/minibatchd
  "$py" bench/load.py --runs 5 --bin "$bin" ${file:+--file "$file"} --json bench/out/load.json | tee bench/out/load.txt
fi
