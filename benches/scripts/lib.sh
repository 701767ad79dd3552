# Shared by the benchmark scripts (sourced, not run): wait_line, and a scratch directory with
# cleanup of child processes.

# wait_line FILE PREFIX: waits up to 30 s for a line of FILE starting with PREFIX and prints
# the rest of it, trimmed; on timeout prints FILE to stderr and exits 1.
wait_line() {
  for _ in $(seq 1 300); do
    if line=$(grep -m1 "^$2" "$1" 2>/dev/null); then
      echo "${line#"$2"}" | xargs
      return
    fi
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1" >&2
  cat "$1" >&2
  exit 1
}

# A scratch directory ($dir) and child processes ($pids) that go away when the script exits.
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
