#!/usr/bin/env bash
# Daemon memory under a burst: VmRSS idle, at the peak of 8 clients of
# shuffled GetBatch(10,000) for 6 s (every minibatch gathered, so it leases
# the memory budget), and 1 s and 5 s after.
#
#   bench/burst.sh BINARY [FILE]      (FILE: a full-size mnist.pkl.gz; default the bundled sample)
set -euo pipefail
bin=$1
data=${2:-}
port=$((40000 + RANDOM % 20000))
"$bin" serve ${data:+--data "$data"} --addr 127.0.0.1:$port --metrics-addr off --no-pin 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 150); do "$bin" health --server 127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.2; done
sleep 2 # start-up work (statistics, row CRCs) done
rss() { awk '/VmRSS/{print int($2/1024)}' /proc/$pid/status; }
echo "idle $(rss) MiB"
"$bin" bench --server 127.0.0.1:$port --size 10000 --shuffle --concurrency 8 --duration 6 --json >/dev/null &
load=$!
peak=0
while kill -0 $load 2>/dev/null; do r=$(rss); [ "$r" -gt "$peak" ] && peak=$r; sleep 0.1; done
wait $load
echo "burst peak $peak MiB"
sleep 1; echo "1 s after $(rss) MiB"
sleep 4; echo "5 s after $(rss) MiB"
