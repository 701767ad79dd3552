#!/usr/bin/env bash
# Flat CPU profile of each role under load: while a self-contained loadgen run is going on
# (gateway mode, CONCURRENCY in flight, 100 B / 100 B), `perf record` samples every CPU for
# 5 s; then the top symbols (self time) of each role, told apart by thread name:
#   gateway  dmsc-worker-0, dmsc-worker-1     agents  agent-0, agent-1     callers  caller-0, caller-1
# Usage: benches/scripts/profile.sh [CONCURRENCY] [TOP]      (defaults 64 and 12)
# Needs: perf, release binaries (cargo build --release -p dmsc-loadgen). Run as a user allowed
# to sample every CPU (root, or kernel.perf_event_paranoid <= 0).
set -euo pipefail
C=${1:-64}
TOP=${2:-12}
BIN=${BIN:-target/release}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

"$BIN/dmsc-loadgen" --concurrency "$C" --duration 8s --warmup 1s --out "$out/lg" >"$out/lg.txt" 2>&1 &
lg=$!
sleep 4 # start-up and warm-up
perf record -F 997 -a -o "$out/perf.data" -- sleep 5 >/dev/null 2>&1
wait "$lg"
grep -E "^requests|CPU µs/req|per request" "$out/lg.txt" || true

role() { # $1 name, $2 comma-separated thread names
  echo
  echo "== $1 ($2): top $TOP symbols by self time, % of the role's samples"
  perf report -i "$out/perf.data" --no-children --comms "$2" --sort dso,sym --stdio \
    --percentage relative 2>/dev/null |
    grep -E '^ +[0-9]' | head -n "$TOP" || true
}
role gateway dmsc-worker-0,dmsc-worker-1
role agents agent-0,agent-1
role callers caller-0,caller-1
