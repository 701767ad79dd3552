#!/usr/bin/env bash
# The A2A path against calling the agent directly, side by side: the same load driver (the
# a2a_load example, Rust, closed loop) sends A2A v1.0 JSON-RPC SendMessage requests either to
# the agent itself or to the front door (client -> front door -> gateway -> adapter -> agent),
# alternating direct and bridged runs, RUNS pairs at each concurrency in CONCURRENCY.
#
# AGENT=python (default): the stock a2a-sdk 1.3.0 test agent (a2a/tests/py/agent_server.py);
# AGENT=rust: the a2a_echo_agent example, which costs next to nothing, so the ratio shows the
# bridge's own cost. A control plane and one gateway (2 workers) run too, all on loopback.
#
# Usage: benches/scripts/a2a_compare.sh [RUNS] [DURATION_MS]        (defaults 3 and 5000)
# PERF_OUT=/tmp/a2a.perf also records `perf record -a` for 2 s of each bridged run.
# Needs: cargo build --release --bins -p dmsc-a2a -p dmsc-dataplane -p dmsc-controlplane \
#        && cargo build --release -p dmsc-a2a --examples
set -euo pipefail
RUNS=${1:-3}
DURATION=${2:-5000}
AGENT=${AGENT:-python}
CONCURRENCY=${CONCURRENCY:-"1 64"}
BIN=${BIN:-target/release}
EX=${EX:-$BIN/examples}
DOMAIN=bench.local

# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

"$BIN/dmsc-control" pki init --dir "$dir/pki" --domain "$DOMAIN" >/dev/null
"$BIN/dmsc-control" pki issue --dir "$dir/pki" --control >/dev/null
"$BIN/dmsc-control" pki issue --dir "$dir/pki" --gateway gw1 >/dev/null
for a in a2a-front echo-adapter; do "$BIN/dmsc-control" pki issue --dir "$dir/pki" --agent "$a" >/dev/null; done
cat >"$dir/domain.toml" <<TOML
[domain]
name = "$DOMAIN"
trust_anchor = "$dir/pki/ca.pem"
[[gateway]]
id = "gw1"
[groups.agents]
members = ["spiffe://$DOMAIN/agent/*"]
advertise = ["*"]
discover = ["*"]
[[invoke]]
effect = "allow"
groups = ["agents"]
capabilities = ["*"]
TOML

DMSC_LOG=warn "$BIN/dmsc-control" serve --config "$dir/domain.toml" --listen 127.0.0.1:0 \
  --admin-listen 127.0.0.1:0 --state-dir "$dir" >"$dir/cp.out" &
pids+=($!)
ctl=$(wait_line "$dir/cp.out" "dmsc-ctl/1 on")
DMSC_LOG=warn "$BIN/dmsc-gateway" --listen 127.0.0.1:0 --workers 2 --no-pin --gateway-id gw1 \
  --domain "$DOMAIN" --cert "$dir/pki/gateways/gw1.pem" --key "$dir/pki/gateways/gw1.key" \
  --ca "$dir/pki/ca.pem" --state-dir "$dir/gw1" --admin-listen 127.0.0.1:0 --control "$ctl" \
  >"$dir/gw.out" &
pids+=($!)
gw_pid=$!
gw=$(wait_line "$dir/gw.out" "dmsc-gateway listening on" | awk '{print $1}')

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
if [ "$AGENT" = rust ]; then
  "$EX/a2a_echo_agent" --port "$port" --skill echo >"$dir/agent.out" 2>&1 &
else
  python3 a2a/tests/py/agent_server.py --port "$port" --name a1 --skill echo >"$dir/agent.out" 2>&1 &
fi
pids+=($!)
agent_pid=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/.well-known/agent-card.json" >/dev/null && break
  sleep 0.1
done

id() { echo --cert "$dir/pki/agents/$1.pem" --key "$dir/pki/agents/$1.key" --ca "$dir/pki/ca.pem"; }
# shellcheck disable=SC2046
DMSC_LOG=warn "$BIN/dmsc-a2a" adapt --gateway "$gw" $(id echo-adapter) \
  --agent-url "http://127.0.0.1:$port" >"$dir/adapt.out" &
pids+=($!)
adapt_pid=$!
wait_line "$dir/adapt.out" "dmsc-a2a adapt: attached:" >/dev/null
# shellcheck disable=SC2046
DMSC_LOG=warn "$BIN/dmsc-a2a" front --gateway "$gw" $(id a2a-front) --listen 127.0.0.1:0 \
  >"$dir/front.out" &
pids+=($!)
front_pid=$!
front=$(wait_line "$dir/front.out" "dmsc-a2a front listening on" | awk '{print $1}')

# CPU ticks (1/100 s) a process has used.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
roles="gateway:$gw_pid agent:$agent_pid adapter:$adapt_pid front:$front_pid"

direct="http://127.0.0.1:$port/"
bridged="$front/a2a/c/echo"
: >"$dir/results"
for c in $CONCURRENCY; do
  for r in $(seq 1 "$RUNS"); do
    for path in direct bridged; do
      url=$direct
      [ "$path" = bridged ] && url=$bridged
      before=$(for rp in $roles; do ticks "${rp#*:}"; done | xargs)
      if [ -n "${PERF_OUT:-}" ] && [ "$path" = bridged ]; then
        # Profile every process during the bridged run (call graphs off: symbols only).
        (sleep 1.5 && perf record -F 1999 -a -o "$PERF_OUT.c$c.r$r" -- sleep 2 >/dev/null 2>&1) &
      fi
      line=$("$EX/a2a_load" --url "$url" --concurrency "$c" --duration-ms "$DURATION" --warmup-ms 1000)
      after=$(for rp in $roles; do ticks "${rp#*:}"; done | xargs)
      echo "$path $c $r $line" >>"$dir/results"
      echo "$path c=$c run $r: $line" >&2
      # CPU per request of each role over the run (warm-up included, so slightly high).
      python3 -c '
import json, sys
roles, b, a, js = sys.argv[1].split(), sys.argv[2].split(), sys.argv[3].split(), json.loads(sys.argv[4])
n = js["requests"] * (1 + 1000 / js.get("duration_ms", 5000))
print("  cpu us/request:", ", ".join(f"{r.partition(chr(58))[0]} {(int(y) - int(x)) * 1e4 / max(n, 1):.1f}" for r, x, y in zip(roles, b, a)))
' "$roles" "$before" "$after" "$line" >&2
    done
  done
done

python3 - "$dir/results" "$AGENT" <<'PY'
import json, sys
rows = [l.split(" ", 3) for l in open(sys.argv[1])]
by = {}
for path, c, r, js in rows:
    by.setdefault((int(c), int(r)), {})[path] = json.loads(js)
print(f"agent: {sys.argv[2]}")
print("conc run | direct rps  p50us  p99us | bridged rps  p50us  p99us | ratio  +p50us  +p99us | driver cpu us/req (d/b) | errors")
for (c, r), d in sorted(by.items()):
    a, b = d["direct"], d["bridged"]
    print(f"{c:4} {r:3} | {a['rps']:10.0f} {a['p50_us']:6} {a['p99_us']:6} | {b['rps']:11.0f} {b['p50_us']:6} {b['p99_us']:6} |"
          f" {b['rps']/a['rps']:5.3f} {b['p50_us']-a['p50_us']:7} {b['p99_us']-a['p99_us']:7} |"
          f" {a['driver_cpu_us_per_request']:6.1f} / {b['driver_cpu_us_per_request']:6.1f} | {a['errors']}/{b['errors']}")
PY
