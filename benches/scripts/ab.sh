#!/usr/bin/env bash
# A/B of two builds of the load generator (each re-executes itself as the gateway), interleaved
# so both see the machine in the same state: `ab.sh OLD NEW [runs] [concurrency] [req] [resp]`.
# Prints, per run, each build's `compare` ratio (gateway / direct req/s), added p50 and p99 and
# CPU per request of the gateway, and writes the JSON summaries to ab-out/.
set -euo pipefail
old=$1 new=$2 runs=${3:-3} conc=${4:-64} req=${5:-100} resp=${6:-100}
out=ab-out
mkdir -p "$out"
for i in $(seq 1 "$runs"); do
  for which in old new; do
    bin=$old; [ "$which" = new ] && bin=$new
    json="$out/$which-c$conc-$req-$resp-$i.json"
    "$bin" compare --concurrency "$conc" --request-bytes "$req" --response-bytes "$resp" \
      --duration 5s --warmup 1s --json "$json" --out "$out/hist" > /dev/null 2>&1
    python3 - "$json" "$which" "$i" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
g, dr = d["gateway"], d["direct"]
print(f"{sys.argv[2]} run {sys.argv[3]}: ratio {g['requests_per_sec'] / dr['requests_per_sec']:.3f}"
      f"  gateway {g['requests_per_sec']:.0f}/s direct {dr['requests_per_sec']:.0f}/s"
      f"  added p50 {g['p50_us'] - dr['p50_us']:.0f} us p99 {g['p99_us'] - dr['p99_us']:.0f} us"
      f"  cpu/req gateway {g['cpu_us_per_request']['gateway']:.2f} total {g['cpu_us_per_request']['total']:.2f}"
      f" (direct total {dr['cpu_us_per_request']['total']:.2f}) us  errors {g['errors']}")
PY
  done
done
