#!/usr/bin/env bash
# Issue 10's target matrix: each load run three times with `dmsc-loadgen compare`, in up to
# three gateway configurations, then one summary line per run.
#   default    the gateway's defaults (one worker per core, no busy polling)
#   dedicated  one worker with busy polling (--gateway-workers 1 --gateway-busy-poll-us 200):
#              the gateway keeps one of the cores while the callers and agents share the rest
#   isolated   the same, with the gateway held on CPU 1 and the callers, agents and control
#              plane on CPU 0, in both modes (--gateway-cpu 1 --load-cpu 0): direct gets the
#              same single CPU the endpoints have through the gateway
# Loads: 100 B / 100 B at 64 and at 1 in flight, 64 KiB and 1 MiB bodies (16 and 8 in flight),
# 1 KiB / 4 KiB at 256 in flight.
# Usage: [CONFIGS="default dedicated isolated"] benches/scripts/targets.sh [OUT_DIR]
#        (default: all three, into targets-out)
# Needs: release binaries (cargo build --release -p dmsc-loadgen) and jq; at least 2 CPUs for
# `isolated`. Takes about 6 minutes per configuration.
# Run nothing else on the machine meanwhile: every figure is a ratio of two modes of one run,
# but a build running through one mode and not the other skews it.
set -euo pipefail
OUT=${1:-targets-out}
BIN=${BIN:-target/release}
mkdir -p "$OUT"

loads=(
  "c64|--concurrency 64 --duration 5s"
  "c1|--concurrency 1 --duration 4s"
  "b64k|--concurrency 16 --request-bytes 65536 --response-bytes 65536 --duration 5s"
  "b1m|--concurrency 8 --request-bytes 1048576 --response-bytes 1048576 --duration 5s"
  "c256|--concurrency 256 --request-bytes 1024 --response-bytes 4096 --duration 5s"
)
all=(
  "default|"
  "dedicated|--gateway-workers 1 --gateway-busy-poll-us 200"
  "isolated|--gateway-workers 1 --gateway-busy-poll-us 200 --gateway-cpu 1 --load-cpu 0"
)
wanted=${CONFIGS:-default dedicated isolated}
configs=()
for c in "${all[@]}"; do
  case " $wanted " in *" ${c%%|*} "*) configs+=("$c") ;; esac
done

for c in "${configs[@]}"; do
  cname=${c%%|*}
  cargs=${c#*|}
  for l in "${loads[@]}"; do
    lname=${l%%|*}
    largs=${l#*|}
    for i in 1 2 3; do
      # shellcheck disable=SC2086 # the argument lists are meant to split
      "$BIN/dmsc-loadgen" compare $largs $cargs --json "$OUT/$cname.$lname.$i.json" \
        --out "$OUT/$cname.$lname.$i" >"$OUT/$cname.$lname.$i.txt" 2>&1
    done
  done
done

echo "config load run: req/s ratio, added p50/p99 us, p99 ratio, gateway CPU us/req, total CPU us/req gateway route / direct"
for c in "${configs[@]}"; do
  for l in "${loads[@]}"; do
    for i in 1 2 3; do
      f="$OUT/${c%%|*}.${l%%|*}.$i.json"
      jq -r --arg name "${c%%|*} ${l%%|*} $i" '
        "\($name): \(.ratios.requests_per_sec) x, +\(.added_latency_us.p50)/+\(.added_latency_us.p99) us, "
        + "p99 \((.gateway.p99_us / .direct.p99_us * 100 | round) / 100) x, "
        + "gateway \(.gateway.cpu_us_per_request.gateway), "
        + "total \(.gateway.cpu_us_per_request.total) / \(.direct.cpu_us_per_request.total)"' "$f"
    done
  done
done
