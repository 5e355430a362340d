# Sourced by the proxy benchmarks that measure the setup of bench/proxy.sh left running.
# hold_start LOG [VAR=value…]: starts `HOLD=1 bench/proxy.sh` (with those variables) in a
# process group of its own, so that `kill -- -$HOLD_PID` stops all of it, and waits until both
# proxies answer (the first run builds the release binaries: minutes). Sets HOLD_PID, HOLD_LOG
# and WORK (proxy.sh's work directory: its nginx configurations, pid files and sidecar.yaml).
hold_start() {
  local log=$1
  HOLD_LOG=$log
  shift
  set -m
  (env "$@" HOLD=1 bash "$ROOT/bench/proxy.sh" >"$log" 2>&1) &
  HOLD_PID=$!
  set +m
  for _ in $(seq 1 3000); do grep -q '^HOLD' "$log" && break; sleep 0.1; done
  grep -q '^HOLD' "$log" || { cat "$log" >&2; echo "bench/proxy.sh did not come up" >&2; exit 1; }
  WORK=$(grep -oP '^HOLD: .* work \K[^;[:space:]]+' "$log")
}

# hold_url NAME, hold_pid NAME: the URL and pid that the HOLD line gives a proxy (sidecar,
# bare, raw; hold_url also nginx); nothing when it is not running.
hold_url() { grep -oP "^HOLD: .*\b$1 \Khttp\S+" "$HOLD_LOG" || true; }
hold_pid() { grep -oP "^HOLD: .*\b$1 \S+ \(pid \K\d+" "$HOLD_LOG" || true; }

# hold_scratch NAME: sets OUT to a new scratch directory, and on exit stops the held setup
# and removes OUT.
hold_scratch() {
  OUT=$(mktemp -d "/tmp/geoforge-$1.XXXXXX")
  trap 'hold_stop' EXIT
}
hold_stop() {
  [ -n "${HOLD_PID:-}" ] && kill -- -"$HOLD_PID" 2>/dev/null || true
  rm -rf "$OUT"
}
