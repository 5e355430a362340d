#!/usr/bin/env bash
# User-space instructions per proxied request (issue 3), counted by valgrind's callgrind:
# geo-sidecar against nginx as the reverse proxy (one worker process, master process off, the
# configuration of bench/proxy.sh) and against the bare hyper 1 proxy of `sidecar/examples/bare_hyper_proxy.rs` (hyper
# on both sides, tokio, the same thread layout and allocator, nothing else), each in front of
# the same upstream nginx as bench/proxy.sh. The sidecar's upstream side is its own HTTP/1.1
# exchange (proxy/h1.rs), cheaper than hyper's client: the difference is its whole path's
# cost over the bare proxy's, not only its features'. The raw floor of
# `sidecar/examples/raw_h1_proxy.rs` (no HTTP library: heads found with httparse and copied
# through unchanged) is counted too.
#
# Unlike requests/s on a shared 2-CPU machine (±15% from run to run), the count is the same
# from run to run to a fraction of a percent, so a change of a few hundred instructions per
# request shows. It leaves out the kernel (about 60% of a proxied request's CPU here) and
# cache effects: a guide for the sidecar's per-request work, not a substitute for bench/proxy.sh.
#
#   bash bench/proxy-instructions.sh            # release build (as shipped)
#   NO_BUILD=1 CARGO_TARGET_DIR=… bash bench/proxy-instructions.sh
#   KEEP=1 …                                    # keep the callgrind files (paths printed)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
if ! command -v valgrind >/dev/null 2>&1; then
  echo "installing valgrind with apt-get" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq valgrind >/dev/null
fi
[ -n "${NO_BUILD:-}" ] || (cd "$ROOT" && cargo build --release -q -p geo-sidecar --bin geo-sidecar --example bare_hyper_proxy --example raw_h1_proxy)
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/release"
OUT=$(mktemp -d /tmp/geoforge-cg.XXXXXX)
HOLD_LOG="$OUT/hold.log"
VG_PID=""
cleanup() {
  [ -n "$VG_PID" ] && kill "$VG_PID" 2>/dev/null || true
  [ -n "${HOLD_PID:-}" ] && kill -- -"$HOLD_PID" 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$OUT"
}
trap cleanup EXIT

# The upstream and a sidecar config, from bench/proxy.sh left running (HOLD).
. "$ROOT/bench/hold.sh"
hold_start "$HOLD_LOG" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}" NO_BUILD=1 IO_THREADS=1
UP=$(grep -oP 'server 127.0.0.1:\K\d+' "$WORK/nginx.conf")
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

count() { # label url cmd… → "label requests instructions/request"
  local label=$1 url=$2; shift 2
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/$label.cg" "$@" 2>"$OUT/$label.vg.log" &
  VG_PID=$!
  for _ in $(seq 1 600); do curl -fs -o /dev/null "$url" 2>/dev/null && break; sleep 0.1; done
  wrk -t1 -c8 -d2s "$url" >/dev/null # warm: pools, caches, lazy statics
  callgrind_control -i on "$VG_PID" >/dev/null 2>&1
  local n
  n=$(wrk -t1 -c8 -d"${SECONDS_PER_RUN}s" "$url" | awk '/requests in/ {print $1}')
  callgrind_control -i off "$VG_PID" >/dev/null 2>&1
  callgrind_control -d "$VG_PID" >/dev/null 2>&1
  kill "$VG_PID"; wait "$VG_PID" 2>/dev/null || true; VG_PID=""
  local ir
  ir=$(callgrind_annotate "$OUT/$label.cg".* 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1; exit}')
  echo "$label $n $((ir / n))"
}

SC=$(free_port); SCA=$(free_port); BARE=$(free_port); RAW=$(free_port)
sed -e "s/service: \"127.0.0.1:[0-9]*\"/service: \"127.0.0.1:$SC\"/" \
    -e "s/admin: \"127.0.0.1:[0-9]*\"/admin: \"127.0.0.1:$SCA\"/" \
    -e "s#stateDir: .*#stateDir: $OUT/state#" "$WORK/sidecar.yaml" >"$OUT/sidecar.yaml"
mkdir -p "$OUT/state"
read -r _ S_N S_IR <<<"$(count sidecar "http://127.0.0.1:$SC/hello" "$TARGET/geo-sidecar" --config "$OUT/sidecar.yaml")"
read -r _ B_N B_IR <<<"$(count bare "http://127.0.0.1:$BARE/hello" "$TARGET/examples/bare_hyper_proxy" "127.0.0.1:$BARE" "127.0.0.1:$UP" 1)"
read -r _ R_N R_IR <<<"$(count raw "http://127.0.0.1:$RAW/hello" "$TARGET/examples/raw_h1_proxy" "127.0.0.1:$RAW" "127.0.0.1:$UP" 1)"
# nginx in the foreground as one process (valgrind follows no fork), proxying as in proxy.sh
NGX=$(free_port); mkdir -p "$OUT/ngx/tmp"
sed -e 's/^worker_processes auto;/daemon off; master_process off; worker_processes 1;/' \
    -e "s#^pid .*#pid $OUT/ngx/nginx.pid;#" -e "s#^error_log .*#error_log $OUT/ngx/error.log warn;#" \
    -e "s#$WORK/tmp#$OUT/ngx/tmp#g" -e "s/listen 127.0.0.1:[0-9]*;/listen 127.0.0.1:$NGX;/" \
    "$WORK/nginx.conf" >"$OUT/ngx/nginx.conf"
read -r _ N_N N_IR <<<"$(count nginx "http://127.0.0.1:$NGX/hello" "$(command -v nginx || echo /usr/sbin/nginx)" -c "$OUT/ngx/nginx.conf" -p "$OUT/ngx")"
echo "user-space instructions per proxied request (callgrind; GET /hello through one I/O thread or worker):"
printf "  %-22s %8s  (%s requests)\n" "geo-sidecar" "$S_IR" "$S_N" "nginx" "$N_IR" "$N_N" "bare hyper 1 proxy" "$B_IR" "$B_N" \
  "raw floor" "$R_IR" "$R_N"
awk -v s="$S_IR" -v n="$N_IR" 'BEGIN { printf "  ratio sidecar / nginx: %.2fx (difference: %d instructions)\n", s/n, s-n }'
awk -v s="$S_IR" -v b="$B_IR" 'BEGIN { printf "  ratio sidecar / bare hyper: %.2fx (difference: %d instructions)\n", s/b, s-b }'
[ -z "${KEEP:-}" ] || echo "callgrind files: $OUT/*.cg.* (callgrind_annotate --inclusive=yes …)"
