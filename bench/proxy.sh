#!/usr/bin/env bash
# Proxy benchmark (issue 3): the same small upstream behind nginx and behind geo-sidecar, at
# the same concurrency, on loopback only. Prints requests/s and p99 for both and the ratios,
# then the sidecar's peak RSS while streaming a 1 GiB body down and up through it.
#
#   bash bench/proxy.sh            # defaults: 9 rounds of 5 s runs, 64 connections, 2 wrk threads
#   DURATION=10s CONNS=128 RUNS=5 bash bench/proxy.sh
#   HOLD=1 NO_BUILD=1 bash bench/proxy.sh   # start both and wait (for perf record)
#   IO_THREADS=1 bash bench/proxy.sh        # the sidecar's proxy.ioThreads (default 0: one per CPU)
#   UPSTREAM=shared bash bench/proxy.sh     # the upstream in the reverse-proxy nginx (see below)
#   ROLE=secondary bash bench/proxy.sh      # the sidecar as a Geo secondary proxying to the upstream
#   FLOOR=1 bash bench/proxy.sh             # also a bare hyper 1 proxy and a raw floor (below)
#   YIELD_EVERY=1 bash bench/proxy.sh       # the sidecar's proxy.yieldEvery (default: the config's)
#   ALT="/path/a yieldEvery=0" bash bench/proxy.sh  # more sidecars in the same rounds (alt1,
#                                           # alt2…), each another build (a binary or a wrapper
#                                           # script) or this build with one proxy setting changed
#
# The upstream is an nginx server answering a small fixed body (and serving a 1 GiB sparse
# file for the streaming run); the reverse-proxy nginx is configured at its best (an
# `upstream` block with keepalive, HTTP/1.1 to the upstream, access log off). The sidecar runs
# the release build as a `role: disabled` site whose forge is the same upstream (ROLE=secondary:
# a secondary whose primary is that upstream).
#
# FLOOR=1 adds two more proxies to the same shuffled rounds. `sidecar/examples/bare_hyper_proxy.rs`:
# hyper 1 on both sides and tokio, with the sidecar's thread layout and allocator and nothing
# else (no header hygiene, routing, metrics, logs, timeouts or retries): what a proxy built
# from hyper's server and client can at best do here. (The sidecar's upstream side is its own
# HTTP/1.1 exchange, proxy/h1.rs, so it can beat this.) bench/proxy-instructions.sh counts the
# same comparison in instructions. `sidecar/examples/raw_h1_proxy.rs`: no HTTP library at all,
# each request head found with httparse and copied to a pooled upstream connection unchanged,
# the response copied back (bodiless requests, Content-Length responses only), with the
# sidecar's threads, allocator and yield: what the kernel and tokio leave for any proxy here.
#
# The upstream runs in its own nginx instance (its own worker processes), as an upstream does
# in any deployment, so both proxies add the same processes to the machine.
# UPSTREAM=shared serves it from the reverse proxy's own workers instead (the layout of the
# first rounds in BENCHMARKS.md): nginx then often handles both ends of a proxied request in
# one process, which no real deployment does, and which the sidecar cannot do.
set -euo pipefail

DURATION=${DURATION:-5s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
RUNS=${RUNS:-9}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/geoforge-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  [ -f "$WORK/up/nginx.pid" ] && kill "$(cat "$WORK/up/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk || ! need curl; then
  echo "installing nginx, wrk and curl with apt-get" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq nginx wrk curl >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "building geo-sidecar (release)" >&2
[ -n "${NO_BUILD:-}" ] || (cd "$ROOT" && cargo build --release -q -p geo-sidecar)
[ -z "${FLOOR:-}" ] || [ -n "${NO_BUILD:-}" ] || (cd "$ROOT" && cargo build --release -q -p geo-sidecar --example bare_hyper_proxy --example raw_h1_proxy)
SIDECAR="${CARGO_TARGET_DIR:-$ROOT/target}/release/geo-sidecar"
BARE="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bare_hyper_proxy"
RAW="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/raw_h1_proxy"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); NGX=$(free_port); SC=$(free_port); SCA=$(free_port); BP=$(free_port); RP=$(free_port)
read -r -a ALTS <<<"${ALT:-}"; AP=(); APA=()
for _ in "${ALTS[@]}"; do AP+=("$(free_port)"); APA+=("$(free_port)"); done

# --- upstream + reverse proxy: one nginx, two server blocks -------------------------------
mkdir -p "$WORK/www/upload" "$WORK/tmp" "$WORK/up/tmp"
chmod 755 "$WORK"; chmod 777 "$WORK/www/upload" # nginx workers run as an unprivileged user
truncate -s 1G "$WORK/www/big"
http_common() { # $1: temp dir prefix
  cat <<EOF
  access_log off;
  client_body_temp_path $1/body; proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fcgi; uwsgi_temp_path $1/uwsgi; scgi_temp_path $1/scgi;
  keepalive_requests 1000000;
EOF
}
UPSTREAM_SERVER=$(cat <<EOF
  # the small upstream
  server {
    listen 127.0.0.1:$UP;
    client_max_body_size 0;
    location = /hello { default_type text/plain; return 200 "hello from the upstream\n"; }
    location = /big { root $WORK/www; }
    # PUT stores the body (nginx reads all of it before answering), then the run deletes it
    location /upload/ { root $WORK/www; dav_methods PUT DELETE; create_full_put_path on; client_body_temp_path $WORK/tmp/put; }
  }
EOF
)
if [ "${UPSTREAM:-separate}" = shared ]; then
  SHARED_UPSTREAM=$UPSTREAM_SERVER
else
  SHARED_UPSTREAM=""
  cat > "$WORK/up/nginx.conf" <<EOF
worker_processes auto;
pid $WORK/up/nginx.pid;
error_log $WORK/up/nginx-error.log warn;
events { worker_connections 4096; }
http {
$(http_common "$WORK/up/tmp")
$UPSTREAM_SERVER
}
EOF
  "$NGINX" -c "$WORK/up/nginx.conf" -p "$WORK/up"
fi
cat > "$WORK/nginx.conf" <<EOF
worker_processes auto;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
$(http_common "$WORK/tmp")
$SHARED_UPSTREAM
  # nginx as the reverse proxy, at its best
  upstream app { server 127.0.0.1:$UP; keepalive 256; }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
EOF
"$NGINX" -c "$WORK/nginx.conf" -p "$WORK"

# --- the sidecar in front of the same upstream --------------------------------------------
"$SIDECAR" keygen --out "$WORK/key.pem" --kid bench.1 >/dev/null
mkdir -p "$WORK/state" "$WORK/data"
if [ "${ROLE:-disabled}" = secondary ]; then
  # The Geo proxy path: a secondary whose primary (static URL) is the upstream. Each request
  # also carries the signed extra-data header and passes the read accelerator's table.
  PEER_KEY=$("$SIDECAR" keygen --out "$WORK/peer.pem" --kid paris.1 | awk '/^key:/ {print $2}')
  ROLE_YAML="role: secondary
primary: { staticUrl: \"http://127.0.0.1:$UP\" }
keys: { kid: bench.1, privateKeyFile: $WORK/key.pem, trusted: [ { kid: paris.1, publicKey: $PEER_KEY } ] }"
else
  ROLE_YAML="role: disabled
keys: { kid: bench.1, privateKeyFile: $WORK/key.pem }
forge: { upstreamUrl: \"http://127.0.0.1:$UP\" }"
fi
cat > "$WORK/sidecar.yaml" <<EOF
siteId: bench
$ROLE_YAML
externalUrl: http://127.0.0.1:$SC
allowInsecure: true
stateDir: $WORK/state
storageRoot: $WORK/data
listen: { service: "127.0.0.1:$SC", admin: "127.0.0.1:$SCA" }
proxy: { ioThreads: ${IO_THREADS:-0}${YIELD_EVERY:+, yieldEvery: $YIELD_EVERY} }
log: { level: warn }
EOF
# Each proxy runs in a session of its own, as the nginx daemons do (nginx calls setsid when it
# daemonizes). With the kernel's autogroup scheduling (sched_autogroup_enabled=1, the default
# on desktop and many server kernels) CPU is shared fairly between sessions first: left in
# this script's session, the sidecar would share one group's share with wrk while nginx had
# a group to itself — measured: p99 1.3–4.1× nginx's that way, 0.78× in separate sessions.
# Under systemd or Kubernetes every service has its own cgroup, which has the same effect.
setsid "$SIDECAR" --config "$WORK/sidecar.yaml" 2>"$WORK/sidecar.log" &
SC_PID=$!; PIDS+=("$SC_PID")
for _ in $(seq 1 200); do
  curl -fs "http://127.0.0.1:$SCA/-/health" >/dev/null 2>&1 && curl -fs "http://127.0.0.1:$NGX/hello" >/dev/null 2>&1 && break
  sleep 0.05
done
curl -fs "http://127.0.0.1:$SC/hello" >/dev/null
if [ -n "${FLOOR:-}" ]; then
  setsid "$BARE" "127.0.0.1:$BP" "127.0.0.1:$UP" "$( [ "${IO_THREADS:-0}" -gt 0 ] && echo "$IO_THREADS" || nproc )" &
  BP_PID=$!; PIDS+=("$BP_PID")
  for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$BP/hello" >/dev/null 2>&1 && break; sleep 0.05; done
  setsid "$RAW" "127.0.0.1:$RP" "127.0.0.1:$UP" "$( [ "${IO_THREADS:-0}" -gt 0 ] && echo "$IO_THREADS" || nproc )" &
  RP_PID=$!; PIDS+=("$RP_PID")
  for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$RP/hello" >/dev/null 2>&1 && break; sleep 0.05; done
fi
for k in "${!ALTS[@]}"; do
  # another build: the same configuration on its own ports and state directory
  mkdir -p "$WORK/alt$k-state"
  bin=${ALTS[$k]}
  edits=(-e "s/127.0.0.1:$SC\"/127.0.0.1:${AP[$k]}\"/" -e "s/127.0.0.1:$SCA\"/127.0.0.1:${APA[$k]}\"/"
         -e "s#stateDir: .*#stateDir: $WORK/alt$k-state#")
  if [[ $bin =~ ^([a-zA-Z]+)=(.+)$ ]]; then # this build, one proxy setting replaced or added
    bin=$SIDECAR
    edits+=(-e "/^proxy: /s/, ${BASH_REMATCH[1]}: [^,}]*//"
            -e "s/^proxy: { \(.*\) }$/proxy: { \1, ${BASH_REMATCH[1]}: ${BASH_REMATCH[2]} }/")
  fi
  sed "${edits[@]}" "$WORK/sidecar.yaml" >"$WORK/alt$k.yaml"
  setsid "$bin" --config "$WORK/alt$k.yaml" 2>"$WORK/alt$k.log" &
  PIDS+=("$!")
  for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:${AP[$k]}/hello" >/dev/null 2>&1 && break; sleep 0.05; done
  echo "alt$((k + 1)): ${ALTS[$k]}"
done
if [ -n "${HOLD:-}" ]; then # for profiling: leave both proxies up until interrupted
  FLOORS=""; [ -z "${FLOOR:-}" ] || FLOORS=" bare http://127.0.0.1:$BP/hello (pid $BP_PID) raw http://127.0.0.1:$RP/hello (pid $RP_PID)"
  echo "HOLD: nginx http://127.0.0.1:$NGX/hello sidecar http://127.0.0.1:$SC/hello (pid $SC_PID)$FLOORS work $WORK; Ctrl-C ends" >&2
  wait "$SC_PID"
fi

# --- requests/s and p99 -------------------------------------------------------------------
run_wrk() { # url → "rps p99_ms"
  wrk -t"$THREADS" -c"$CONNS" -d1s "$1" >/dev/null 2>&1 # warm-up
  local out; out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$1")
  local rps; rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  local p99; p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  local errs; errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out")
  [ -n "$errs" ] && echo "  wrk: $errs" >&2
  echo "$rps $(to_ms "$p99")"
}
to_ms() { # wrk latency (e.g. 1.23ms, 850.00us, 1.02s) → ms
  awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'
}

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "wrk -t$THREADS -c$CONNS -d$DURATION, GET /hello (24-byte body), loopback; upstream: ${UPSTREAM:-separate} nginx; sidecar role ${ROLE:-disabled}, ioThreads: ${IO_THREADS:-0} (0: one per CPU)"
# Rounds: each runs every proxy once, in a shuffled order (no proxy always runs right after
# another's load or first in a round). This machine's speed drifts by ±15 % over tens of
# seconds, so the per-round ratio (a proxy against nginx's run of the same round) is the
# figure to read; the summary gives its median over the rounds with a 95 % bootstrap
# interval, which says whether a difference is larger than the drift.
N_R=(); N_P=(); S_R=(); S_P=(); B_R=(); B_P=(); W_R=(); W_P=(); declare -A A_R A_P
PROXIES="nginx sidecar"; [ -n "${FLOOR:-}" ] && PROXIES+=" bare raw"
for k in "${!ALTS[@]}"; do PROXIES+=" alt$k"; done
: >"$WORK/rounds.tsv"
for i in $(seq 1 "$RUNS"); do
  for proxy in $(printf "%s\n" $PROXIES | shuf); do
    case $proxy in
      nginx) read -r r p <<<"$(run_wrk "http://127.0.0.1:$NGX/hello")"; N_R+=("$r"); N_P+=("$p") ;;
      sidecar) read -r r p <<<"$(run_wrk "http://127.0.0.1:$SC/hello")"; S_R+=("$r"); S_P+=("$p") ;;
      bare) read -r r p <<<"$(run_wrk "http://127.0.0.1:$BP/hello")"; B_R+=("$r"); B_P+=("$p") ;;
      raw) read -r r p <<<"$(run_wrk "http://127.0.0.1:$RP/hello")"; W_R+=("$r"); W_P+=("$p") ;;
      alt*) k=${proxy#alt}; read -r r p <<<"$(run_wrk "http://127.0.0.1:${AP[$k]}/hello")"; A_R[$k]=$r; A_P[$k]=$p ;;
    esac
  done
  line=$(printf "  run %d: nginx %s req/s p99 %s ms | sidecar %s req/s p99 %s ms" "$i" "${N_R[-1]}" "${N_P[-1]}" "${S_R[-1]}" "${S_P[-1]}")
  [ -z "${FLOOR:-}" ] || line+=$(printf " | bare hyper %s req/s p99 %s ms | raw %s req/s p99 %s ms" "${B_R[-1]}" "${B_P[-1]}" "${W_R[-1]}" "${W_P[-1]}")
  for k in "${!ALTS[@]}"; do line+=$(printf " | alt%d %s req/s p99 %s ms" $((k + 1)) "${A_R[$k]}" "${A_P[$k]}"); done
  echo "$line"
  round="${N_R[-1]} ${N_P[-1]} ${S_R[-1]} ${S_P[-1]}"
  [ -z "${FLOOR:-}" ] || round+=" ${B_R[-1]} ${B_P[-1]} ${W_R[-1]} ${W_P[-1]}"
  for k in "${!ALTS[@]}"; do round+=" ${A_R[$k]} ${A_P[$k]}"; done
  echo "$round" >>"$WORK/rounds.tsv"
done
median() { printf "%s\n" "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
N_RPS=$(median "${N_R[@]}"); N_P99=$(median "${N_P[@]}")
S_RPS=$(median "${S_R[@]}"); S_P99=$(median "${S_P[@]}")
echo "median of $RUNS runs:"
printf "%-10s %12s %10s\n" proxy "requests/s" "p99 ms"
printf "%-10s %12s %10s\n" nginx "$N_RPS" "$N_P99"
printf "%-10s %12s %10s\n" sidecar "$S_RPS" "$S_P99"
awk -v s="$S_RPS" -v n="$N_RPS" -v sp="$S_P99" -v np="$N_P99" \
  'BEGIN { printf "ratio of medians sidecar/nginx: requests/s %.2fx, p99 %.2fx\n", s/n, sp/np }'
if [ -n "${FLOOR:-}" ]; then
  B_RPS=$(median "${B_R[@]}"); B_P99=$(median "${B_P[@]}")
  printf "%-10s %12s %10s\n" "bare hyper" "$B_RPS" "$B_P99"
  awk -v b="$B_RPS" -v n="$N_RPS" -v s="$S_RPS" -v bp="$B_P99" -v np="$N_P99" \
    'BEGIN { printf "ratio of medians bare hyper/nginx: requests/s %.2fx, p99 %.2fx; sidecar/bare hyper: requests/s %.2fx\n", b/n, bp/np, s/b }'
  W_RPS=$(median "${W_R[@]}"); W_P99=$(median "${W_P[@]}")
  printf "%-10s %12s %10s\n" "raw floor" "$W_RPS" "$W_P99"
  awk -v w="$W_RPS" -v n="$N_RPS" -v s="$S_RPS" -v wp="$W_P99" -v np="$N_P99" \
    'BEGIN { printf "ratio of medians raw floor/nginx: requests/s %.2fx, p99 %.2fx; sidecar/raw floor: requests/s %.2fx\n", w/n, wp/np, s/w }'
fi
# Per-round ratios: median, 95 % bootstrap interval of the median (fixed seed), rounds won.
PYTHONPATH="$ROOT/bench" python3 - "$WORK/rounds.tsv" "${FLOOR:-}" "${#ALTS[@]}" <<'PY'
import sys
from pool_rounds import interval
rows = [[float(x) for x in l.split()] for l in open(sys.argv[1]) if l.strip()]
def report(name, xs, better):
    median, lo, hi = interval(xs)
    won = sum(1 for x in xs if better(x))
    print(f"  {name}: median {median:.3f}x (95% interval {lo:.3f}-{hi:.3f}), "
          f"better than or equal to the peer in {won} of {len(xs)} rounds")
print(f"per-round ratios over {len(rows)} rounds:")
report("sidecar/nginx requests/s", [r[2] / r[0] for r in rows], lambda x: x >= 1)
report("sidecar/nginx p99       ", [r[3] / r[1] for r in rows], lambda x: x <= 1)
if sys.argv[2]:
    report("bare/nginx requests/s   ", [r[4] / r[0] for r in rows], lambda x: x >= 1)
    report("bare/nginx p99          ", [r[5] / r[1] for r in rows], lambda x: x <= 1)
    report("raw/nginx requests/s    ", [r[6] / r[0] for r in rows], lambda x: x >= 1)
    report("raw/nginx p99           ", [r[7] / r[1] for r in rows], lambda x: x <= 1)
    report("sidecar/raw requests/s  ", [r[2] / r[6] for r in rows], lambda x: x >= 1)
for k in range(int(sys.argv[3])):
    a = (8 if sys.argv[2] else 4) + 2 * k
    report(f"alt{k + 1}/nginx requests/s   ", [r[a] / r[0] for r in rows], lambda x: x >= 1)
    report(f"alt{k + 1}/nginx p99          ", [r[a + 1] / r[1] for r in rows], lambda x: x <= 1)
    report(f"alt{k + 1}/sidecar requests/s ", [r[a] / r[2] for r in rows], lambda x: x >= 1)
    report(f"alt{k + 1}/sidecar p99        ", [r[a + 1] / r[3] for r in rows], lambda x: x <= 1)
PY
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

# --- RSS while streaming 1 GiB --------------------------------------------------------------
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$SC_PID/status"; }
peak_during() { # command… → peak RSS (KiB) of the sidecar while it runs
  "$@" &
  local job=$! peak=0 r
  while kill -0 "$job" 2>/dev/null; do
    r=$(rss_kb); [ "${r:-0}" -gt "$peak" ] && peak=$r
    sleep 0.05
  done
  wait "$job"
  echo "$peak"
}
IDLE=$(rss_kb)
DOWN=$(peak_during sh -c "curl -fs -o /dev/null -w '%{size_download}' http://127.0.0.1:$SC/big > $WORK/down.size")
DOWN_SIZE=$(cat "$WORK/down.size")
UPL=$(peak_during sh -c "head -c 1073741824 /dev/zero | curl -fs -o /dev/null -T - -H 'Content-Type: application/octet-stream' http://127.0.0.1:$SC/upload/big")
UP_SIZE=$(stat -c %s "$WORK/www/upload/big" 2>/dev/null || echo 0)
rm -f "$WORK/www/upload/big"
[ "$UP_SIZE" -eq 1073741824 ] || echo "warning: the upstream stored $UP_SIZE bytes of the upload, not 1 GiB" >&2
echo "sidecar RSS: idle $((IDLE / 1024)) MiB; peak while streaming 1 GiB down $((DOWN / 1024)) MiB, up $((UPL / 1024)) MiB (client received $DOWN_SIZE bytes; upstream stored $UP_SIZE bytes)"
