#!/usr/bin/env bash
# Where a proxied request's CPU goes (issue 3): user and system µs per request of the proxy,
# of the upstream nginx and of wrk, for nginx as the reverse proxy and for geo-sidecar, in
# alternating runs against the setup of bench/proxy.sh (left running with HOLD=1), plus how
# busy the machine was. It shows how far a cheaper proxy can move requests/s on this machine:
# the proxy's share of all the CPU a request costs, and the kernel's share of the proxy's.
#
#   NO_BUILD=1 bash bench/proxy-cpu.sh          # ROUNDS=4, SECONDS_PER_RUN=5, CONNS=64
#   NO_BUILD=1 FLOOR=1 bash bench/proxy-cpu.sh  # also the bare hyper proxy and the raw floor
#
# The upstream does the same work per request behind either proxy, so the proxy's CPU divided
# by the upstream's in the same run ("÷ upstream") compares the proxies with the machine's
# speed, which drifts here by ±15 % between runs, taken out.
#
# Times come from /proc/<pid>/stat (utime, stime; clock ticks, usually 10 ms) of the proxy's
# processes and the upstream's worker processes, and from the shell's `times` for wrk.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-4}
SECS=${SECONDS_PER_RUN:-5}
CONNS=${CONNS:-64}
. "$ROOT/bench/hold.sh"
hold_scratch cpu
hold_start "$OUT/hold.log" FLOOR="${FLOOR:-}"
NGX_PIDS=$(pgrep -P "$(cat "$WORK/nginx.pid")" | tr '\n' ' ')
UP_PIDS=$(pgrep -P "$(cat "$WORK/up/nginx.pid")" | tr '\n' ' ')
HZ=$(getconf CLK_TCK)

ticks() { for p in "$@"; do awk '{print $14, $15}' "/proc/$p/stat"; done | awk '{u+=$1; s+=$2} END {print u+0, s+0}'; }
# "proxy-user proxy-system upstream-user upstream-system machine-busy machine-idle" (ticks)
snapshot() { echo "$(ticks "$@") $(ticks $UP_PIDS) $(awk '/^cpu / {print $2+$3+$4+$6+$7+$8, $5}' /proc/stat)"; }
to_s() { awk -v t="$1" 'BEGIN { split(t, a, "m"); sub("s", "", a[2]); print a[1]*60 + a[2] }'; }

measure() { # label url pids… → one line
  local label=$1 url=$2; shift 2
  wrk -t2 -c"$CONNS" -d1s "$url" >/dev/null
  local before after wrk_times n
  before=$(snapshot "$@")
  wrk_times=$( (wrk -t2 -c"$CONNS" -d"${SECS}s" "$url" >"$OUT/wrk.out"; times) | tail -1)
  after=$(snapshot "$@")
  n=$(awk '/requests in/ {print $1}' "$OUT/wrk.out")
  awk -v l="$label" -v n="$n" -v d="$SECS" -v hz="$HZ" -v b="$before" -v a="$after" \
      -v wu="$(to_s "${wrk_times% *}")" -v ws="$(to_s "${wrk_times#* }")" 'BEGIN {
    split(b, x); split(a, y); for (i = 1; i <= 6; i++) dt[i] = y[i] - x[i]
    f = 1e6 / hz / n
    pr = (dt[1] + dt[2]) * f; up = (dt[3] + dt[4]) * f; w = (wu + ws) * 1e6 / n; all = pr + up + w
    printf "%-8s %7.0f req/s | proxy %5.2f user %5.2f sys, %4.2f÷ upstream | upstream %5.2f | wrk %5.2f | all %5.1f µs/req, proxy %2.0f%% of it | machine busy %3.0f%%\n",
      l, n / d, dt[1] * f, dt[2] * f, pr / up, up, w, all, 100 * pr / all, 100 * dt[5] / (dt[5] + dt[6]) }'
}

echo "µs of CPU per request (wrk -t2 -c$CONNS -d${SECS}s, GET /hello; $(nproc) CPUs)"
for _ in $(seq 1 "$ROUNDS"); do
  measure nginx "$(hold_url nginx)" $NGX_PIDS
  for p in sidecar bare raw; do
    [ -z "$(hold_pid $p)" ] || measure $p "$(hold_url $p)" "$(hold_pid $p)"
  done
done
