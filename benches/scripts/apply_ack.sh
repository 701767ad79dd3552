#!/usr/bin/env bash
# Apply-to-acknowledgement latency of a policy change: a control plane and GATEWAYS gateways
# (real processes on loopback, 2 workers each), then APPLIES applies of an edited domain.toml,
# one every PAUSE seconds (longer than the 100 ms push debounce, so no apply waits for it).
# Each apply's time is the control plane's own `elapsed_ms` (from receiving POST /apply to the
# last gateway's ACK: reload, compile, push, decode, install on every worker, save, ACK).
#
# Usage: benches/scripts/apply_ack.sh [APPLIES] [GATEWAYS]     (defaults 100 and 3)
# Needs release binaries: cargo build --release --bins
set -euo pipefail
APPLIES=${1:-100}
GATEWAYS=${2:-3}
PAUSE=${PAUSE:-0.15}
BIN=${BIN:-target/release}
DOMAIN=bench.local
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

"$BIN/dmsc-control" pki init --dir "$dir/pki" --domain "$DOMAIN" >/dev/null
"$BIN/dmsc-control" pki issue --dir "$dir/pki" --control >/dev/null
for i in $(seq 1 "$GATEWAYS"); do
  "$BIN/dmsc-control" pki issue --dir "$dir/pki" --gateway "gw$i" >/dev/null
done

write_config() { # $1: version
  {
    echo "capabilities = [\"bench.v$1\"]"
    printf '[domain]\nname = "%s"\ntrust_anchor = "%s"\n' "$DOMAIN" "$dir/pki/ca.pem"
    for i in $(seq 1 "$GATEWAYS"); do printf '[[gateway]]\nid = "gw%s"\n' "$i"; done
    printf '[groups.agents]\nmembers = ["spiffe://%s/agent/*"]\nadvertise = ["*"]\ndiscover = ["*"]\n' "$DOMAIN"
    printf '[[invoke]]\neffect = "allow"\ngroups = ["agents"]\ncapabilities = ["*"]\n'
  } >"$dir/domain.toml.tmp"
  mv "$dir/domain.toml.tmp" "$dir/domain.toml"
}
write_config 0

DMSC_LOG=warn "$BIN/dmsc-control" serve --config "$dir/domain.toml" --listen 127.0.0.1:0 \
  --admin-listen 127.0.0.1:0 --state-dir "$dir" >"$dir/cp.out" &
pids+=($!)
ctl=$(wait_line "$dir/cp.out" "dmsc-ctl/1 on")
admin=$(wait_line "$dir/cp.out" "admin endpoint:" | sed 's#http://##; s#/.*##')

for i in $(seq 1 "$GATEWAYS"); do
  DMSC_LOG=warn "$BIN/dmsc-gateway" --listen 127.0.0.1:0 --workers 2 --no-pin \
    --gateway-id "gw$i" --domain "$DOMAIN" --cert "$dir/pki/gateways/gw$i.pem" \
    --key "$dir/pki/gateways/gw$i.key" --ca "$dir/pki/ca.pem" --state-dir "$dir/gw$i" \
    --admin-listen 127.0.0.1:0 --control "$ctl" >"$dir/gw$i.out" &
  pids+=($!)
done
for i in $(seq 1 "$GATEWAYS"); do wait_line "$dir/gw$i.out" "dmsc-gateway listening on" >/dev/null; done

: >"$dir/times"
for v in $(seq 1 "$APPLIES"); do
  write_config "$v"
  "$BIN/dmsc-control" apply --admin "$admin" --json >"$dir/apply.json"
  python3 -c '
import json, sys
a = json.load(open(sys.argv[1]))
assert a["changed"] and all(g["result"] == "acked" for g in a["gateways"]), a
print(a["elapsed_ms"])' "$dir/apply.json" >>"$dir/times"
  sleep "$PAUSE"
done

python3 - "$dir/times" "$GATEWAYS" <<'EOF'
import sys
t = sorted(float(x) for x in open(sys.argv[1]))
def pct(p):
    return t[min(len(t) - 1, int(round(p / 100 * len(t) + 0.5)) - 1)]
print(f"{len(t)} applies acknowledged by {sys.argv[2]} gateways: "
      f"p50 {pct(50):.2f} ms, p90 {pct(90):.2f} ms, p99 {pct(99):.2f} ms, max {t[-1]:.2f} ms")
EOF
