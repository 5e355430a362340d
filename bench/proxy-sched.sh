#!/usr/bin/env bash
# Per proxied request: system calls, epoll_waits, yields and context switches of the proxy, of
# the upstream nginx's workers and of wrk (issue 3), counted with `perf stat` (software events
# and syscall tracepoints: no hardware counters needed, so it works in VMs). Against the setup
# of bench/proxy.sh (left running with HOLD=1). Unlike requests/s, these counts hardly move
# with the machine's drift, so they show how a proxy's way of waiting changes the work of the
# processes around it: a proxy that hands the upstream and the client their work in smaller
# batches makes them wake and poll more often per request.
#
#   NO_BUILD=1 bash bench/proxy-sched.sh                 # ROUNDS=2, 5 s runs, 64 connections
#   NO_BUILD=1 FLOOR=1 bash bench/proxy-sched.sh         # also the bare hyper proxy and raw floor
#   NO_BUILD=1 YIELD_EVERY=0 bash bench/proxy-sched.sh   # the sidecar's proxy.yieldEvery
#
# perf's tracing slows every process a little, so the requests/s printed here are lower than
# bench/proxy.sh's; read the counts, not the rates.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-2}
. "$ROOT/bench/hold.sh"
hold_scratch sched
if ! command -v perf >/dev/null 2>&1; then
  echo "installing perf (linux-perf) with apt-get" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq linux-perf >/dev/null
fi

hold_start "$OUT/hold.log" FLOOR="${FLOOR:-}" YIELD_EVERY="${YIELD_EVERY:-}"
NGX_PIDS=$(pgrep -P "$(cat "$WORK/nginx.pid")" | paste -sd,)
UP_PIDS=$(pgrep -P "$(cat "$WORK/up/nginx.pid")" | paste -sd,)
EV=task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_sched_yield

per_request() { # label part file requests
  awk -F, -v l="$1" -v part="$2" -v n="$4" '
    BEGIN { printf "%-8s %-9s", l, part }
    $1 ~ /^[0-9.]+$/ {
      name = $3; sub("syscalls:sys_enter_", "", name); sub("raw_syscalls:sys_enter", "syscalls", name)
      if (name == "task-clock") printf " cpu %6.2f µs", $1 * 1000 / n
      else printf " | %s %.3f", name, $1 / n
    }
    END { print "" }' "$3"
}
measure() { # label url pids
  local l=$1 u=$2 p=$3
  wrk -t2 -c64 -d1s "$u" >/dev/null
  perf stat -x, -e "$EV" -p "$p" -o "$OUT/$l.proxy" -- sleep 5 &
  local a=$!
  perf stat -x, -e "$EV" -p "$UP_PIDS" -o "$OUT/$l.up" -- sleep 5 &
  local b=$!
  perf stat -x, -e "$EV" -o "$OUT/$l.wrk" -- wrk -t2 -c64 -d5s "$u" >"$OUT/$l.out"
  wait "$a" "$b"
  local n; n=$(awk '/requests in/ {print $1}' "$OUT/$l.out")
  per_request "$l" proxy "$OUT/$l.proxy" "$n"
  per_request "$l" upstream "$OUT/$l.up" "$n"
  per_request "$l" wrk "$OUT/$l.wrk" "$n"
}
echo "per request (wrk -t2 -c64 -d5s, GET /hello; $(nproc) CPUs; sidecar yieldEvery ${YIELD_EVERY:-default})"
for _ in $(seq 1 "$ROUNDS"); do
  measure nginx "$(hold_url nginx)" "$NGX_PIDS"
  for p in sidecar bare raw; do
    [ -z "$(hold_pid $p)" ] || measure $p "$(hold_url $p)" "$(hold_pid $p)"
  done
done
