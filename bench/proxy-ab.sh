#!/usr/bin/env bash
# Head to head: this checkout's release sidecar (bench/proxy.sh's setup, left running) against
# another build of it, `OLD`, behind the same upstream, in alternating rounds of wrk. For a
# change whose effect is smaller than the drift between sets of bench/proxy.sh.
#
#   git worktree add /tmp/old <rev> && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target \
#     cargo build --release -p geo-sidecar --bin geo-sidecar)
#   OLD=/tmp/old-target/release/geo-sidecar [N=8] [D=5] [PERF=1] bash bench/proxy-ab.sh
#
# PERF=1 also counts cycles and instructions of each process over one run (`perf stat`).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${OLD:?set OLD to the other geo-sidecar binary}"
. "$ROOT/bench/hold.sh"
TMP=$(mktemp -d /tmp/geoforge-ab.XXXXXX)
hold_start "$TMP/hold.log" NO_BUILD=1
OPID=""
trap 'kill -- -$HOLD_PID 2>/dev/null; [ -n "$OPID" ] && kill $OPID 2>/dev/null; rm -rf "$TMP"' EXIT
NEWPID=$(hold_pid sidecar)
NEWURL=$(hold_url sidecar)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P=$(free_port); PA=$(free_port); mkdir -p $TMP/state
sed -e "s/service: \"127.0.0.1:[0-9]*\"/service: \"127.0.0.1:$P\"/" -e "s/admin: \"127.0.0.1:[0-9]*\"/admin: \"127.0.0.1:$PA\"/" \
    -e "s#stateDir: .*#stateDir: $TMP/state#" "$WORK/sidecar.yaml" > $TMP/sidecar.yaml
setsid "$OLD" --config $TMP/sidecar.yaml 2>$TMP/old.log & OPID=$!
OLDURL="http://127.0.0.1:$P/hello"
for _ in $(seq 1 100); do curl -fs "$OLDURL" >/dev/null 2>&1 && break; sleep 0.1; done
run() { wrk -t2 -c64 -d${D:-5}s "$1" | awk '/Requests\/sec/ {print $2}'; }
wrk -t2 -c64 -d1s "$NEWURL" >/dev/null; wrk -t2 -c64 -d1s "$OLDURL" >/dev/null
for i in $(seq 1 ${N:-8}); do
  if [ $((i % 2)) -eq 0 ]; then a=$(run "$NEWURL"); b=$(run "$OLDURL"); else b=$(run "$OLDURL"); a=$(run "$NEWURL"); fi
  echo "round $i new $a old $b ratio $(python3 -c "print(round($a/$b,3))")"
done
if [ -n "${PERF:-}" ]; then
  for which in new old; do
    if [ $which = new ]; then pid=$NEWPID; url=$NEWURL; else pid=$OPID; url=$OLDURL; fi
    perf stat -e cycles,instructions -p "$pid" -o "$TMP/perf-$which.txt" -- sleep 5 &
    n=$(wrk -t2 -c64 -d5s "$url" | awk '/requests in/ {print $1}')
    wait
    echo "$which requests $n"; grep -E "cycles|instructions|cache" $TMP/perf-$which.txt
  done
fi
