#!/usr/bin/env bash
# The loadgen sweep behind docs/BENCHMARKS.md: gateway vs direct at several concurrencies and
# payload sizes, then an open-loop rate sweep. Prints Markdown tables; raw JSON goes to
# target/bench-sweep/. Takes about 3 minutes on 2 cores after the release build.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=target/bench-sweep
mkdir -p "$out"
cargo build --release --locked -p dmsc-loadgen
lg=target/release/dmsc-loadgen
duration=${DURATION:-4s}

for sizes in "100 100" "1024 4096"; do
  set -- $sizes
  for c in 1 16 64 256; do
    "$lg" compare --concurrency "$c" --request-bytes "$1" --response-bytes "$2" \
      --duration "$duration" --warmup 1s --json "$out/compare-$1-$2-c$c.json" \
      --out "$out/compare-$1-$2-c$c" >/dev/null
  done
done

for rate in ${RATES:-2000 5000 10000 20000 30000 40000}; do
  for mode in gateway direct; do
    "$lg" --mode "$mode" --rate "$rate" --request-bytes 100 --response-bytes 100 \
      --duration "$duration" --warmup 1s --json "$out/rate-$mode-$rate.json" \
      --out "$out/rate-$mode-$rate" >/dev/null || true
  done
done

python3 - "$out" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
def load(p):
    with open(p) as f:
        return json.load(f)
print("| req/resp bytes | in flight | gateway req/s | direct req/s | ratio | gateway p50/p99 µs | direct p50/p99 µs | added p50/p99 µs | CPU µs/req gateway (callers+agents direct) |")
print("|---|---|---|---|---|---|---|---|---|")
for sizes in ["100-100", "1024-4096"]:
    for c in [1, 16, 64, 256]:
        p = f"{out}/compare-{sizes}-c{c}.json"
        if not os.path.exists(p):
            continue
        j = load(p); g, d = j["gateway"], j["direct"]
        cg, cd = g["cpu_us_per_request"], d["cpu_us_per_request"]
        direct_sum = (cd.get("callers") or 0) + (cd.get("agents") or 0)
        print(f"| {sizes.replace('-', ' / ')} | {c} | {g['requests_per_sec']:,.0f} | {d['requests_per_sec']:,.0f} | "
              f"{j['ratios']['requests_per_sec']:.2f} | {g['p50_us']:,} / {g['p99_us']:,} | {d['p50_us']:,} / {d['p99_us']:,} | "
              f"{j['added_latency_us']['p50']:,} / {j['added_latency_us']['p99']:,} | "
              f"{cg.get('gateway') or 0:.1f} ({direct_sum:.1f}) |")
print()
print("| offered rate | gateway p50/p99 µs | gateway errors | direct p50/p99 µs | direct errors |")
print("|---|---|---|---|---|")
rates = sorted({int(os.path.basename(p).split('-')[2].split('.')[0]) for p in glob.glob(f"{out}/rate-*.json")})
for r in rates:
    row = [f"{r:,}/s"]
    for mode in ["gateway", "direct"]:
        p = f"{out}/rate-{mode}-{r}.json"
        if os.path.exists(p):
            j = load(p)
            row += [f"{j['p50_us']:,} / {j['p99_us']:,}", str(sum(j['errors'].values()) if j['errors'] else 0)]
        else:
            row += ["-", "-"]
    print("| " + " | ".join(row) + " |")
PY
