#!/usr/bin/env bash
# Acceleration benchmark (issue 6): a far site's `git clone`, on one machine, loopback only.
#
#   bash bench/accel.sh              (env below; results in bench/out/accel-<time>/)
#
# A primary geo-sidecar (embedded forge, anonymous read) and a secondary whose link to the
# primary is bench/wan_relay.py (default 100 ms RTT, 100 Mbit/s). Once the secondary has
# synced, full bare clones of a generated repository (pack ≥ 200 MB, built once and cached in
# bench/cache/) are timed, RUNS times each, median:
#   (a) via the secondary (accelerated; checked with geo_accel_served_locally_total);
#   (b) directly from the primary through the emulated link, at 100 Mbit/s and at 20 Mbit/s;
#   (c) the limit: git http-backend behind nginx + fcgiwrap on loopback, same repository;
#   (d) the nearest peer: git-cache-proxy (crates.io) beside the secondary, in front of the
#       primary through the same kind of link, warmed with one clone first.
# Then a clone storm: STORM concurrent clones of a ~20 MB repository via the secondary, the
# local http-backend and the peer (total wall time, per-clone p50 and max).
#
# Env: RUNS=3 RUNS_SLOW=3 (20 Mbit/s runs) STORM=20 DELAY_MS=50 (one way) RATE_MBIT=100
#      SLOW_MBIT=20 CLONE_TIMEOUT=900 KEEP=0 (1: keep the work dir)
#      ACCEL_ONLY=all|big|storm|overhead|prepare (prepare: build and generate the repositories
#      only; overhead: ls-remote round trips and clones of the replica by http-backend)
# Needs: git, curl, python3, nginx, fcgiwrap (apt-get when missing), cargo.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH="$ROOT/bench"
CACHE="$BENCH/cache"
RUNS=${RUNS:-3}
RUNS_SLOW=${RUNS_SLOW:-3}
STORM=${STORM:-20}
DELAY_MS=${DELAY_MS:-50}
RATE_MBIT=${RATE_MBIT:-100}
SLOW_MBIT=${SLOW_MBIT:-20}
CLONE_TIMEOUT=${CLONE_TIMEOUT:-900}
ONLY=${ACCEL_ONLY:-all}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT="$BENCH/out/accel-$STAMP"
WORK=$(mktemp -d /tmp/geo-accel.XXXXXX)
mkdir -p "$OUT" "$CACHE"
RESULTS="$OUT/results.tsv"
: > "$RESULTS"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/notes.txt" >&2; }

# ---------------------------------------------------------------- stop everything on exit ---
PIDS=()
FCGI_PID=""; FCGI_PGID=""
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  # fcgiwrap's preforked children outlive their parent: stop its whole process group.
  [ -n "$FCGI_PGID" ] && kill -TERM -- "-$FCGI_PGID" 2>/dev/null
  [ -n "$FCGI_PID" ] && kill -TERM "$FCGI_PID" 2>/dev/null
  [ -f "$WORK/nginx.pid" ] && kill -TERM "$(cat "$WORK/nginx.pid" 2>/dev/null)" 2>/dev/null
  # bounded wait for them to go, then KILL what is left
  for _ in $(seq 1 50); do
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  [ -n "$FCGI_PGID" ] && kill -KILL -- "-$FCGI_PGID" 2>/dev/null
  for f in primary/sidecar.log secondary/sidecar.log gcp.log nginx-error.log fcgiwrap.log \
           relay-sites.log relay-fast.log relay-slow.log; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$(echo "$f" | tr / -)"
  done
  if [ "${KEEP:-0}" = 1 ]; then echo "work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------------------- tools ---
need() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
missing=()
for t in nginx fcgiwrap python3 git curl; do need "$t" || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} with apt-get"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
FCGIWRAP=$(command -v fcgiwrap || echo /usr/sbin/fcgiwrap)
HTTP_BACKEND="$(git --exec-path)/git-http-backend"

log "building geo-sidecar (release)"
(cd "$ROOT" && cargo build --release -q -p geo-sidecar)
SIDECAR="${CARGO_TARGET_DIR:-$ROOT/target}/release/geo-sidecar"

# The peer, git-cache-proxy, from crates.io into bench/cache/bin (once).
GCP="$CACHE/bin/git-cache-proxy"
PEER_ERR=""
if [ ! -x "$GCP" ] && [ "$ONLY" != prepare ]; then
  log "installing git-cache-proxy from crates.io into $CACHE/bin"
  if ! cargo install git-cache-proxy --locked --root "$CACHE" >"$OUT/gcp-install.log" 2>&1; then
    PEER_ERR="cargo install git-cache-proxy --locked failed: $(tail -n 3 "$OUT/gcp-install.log" | tr '\n' ' ')"
    log "$PEER_ERR"
  fi
fi
PEER_VERSION=$([ -x "$GCP" ] && "$GCP" --version 2>/dev/null | head -1 || echo none)

# ------------------------------------------------- the generated repositories (cached) ---
# A fast-import stream: COMMITS commits on main (tags every 50, a release branch), each
# editing EDITS of FILES source-like text files (deltas compress well) and rewriting BINS
# binary assets of BIN_KB KiB of random bytes (incompressible), like a game or ML repo.
GEN_VERSION=1
gen_repo() { # name commits files edits bins bin_kb pool
  local name=$1 dir="$CACHE/repos/$1.git"
  if [ -f "$dir/.bench-done-v$GEN_VERSION" ]; then return; fi
  log "generating $name.git (once; cached in $dir)"
  rm -rf "$dir" && mkdir -p "$(dirname "$dir")"
  git init -q --bare -b main "$dir"
  python3 - "$2" "$3" "$4" "$5" "$6" "$7" <<'PY' | git -C "$dir" fast-import --quiet --done
import random, sys
commits, files, edits, bins, bin_kb, pool = map(int, sys.argv[1:])
rnd = random.Random(6)
out = sys.stdout.buffer
words = ("let mut self fn impl match return async await struct enum pub use mod trait where "
         "Option Result Some None Ok Err Vec String HashMap config request response client "
         "server replica primary secondary fetch push sync verify checksum event cursor").split()

def line():
    k = rnd.randint(3, 12)
    return "    " * rnd.randint(0, 3) + " ".join(rnd.choice(words) for _ in range(k)) + ";\n"

def blob(data):
    out.write(b"blob\ndata %d\n" % len(data)); out.write(data); out.write(b"\n")

texts = {}
for i in range(files):
    path = "src/mod%02d/file%04d.rs" % (i % 64, i)
    texts[path] = [line() for _ in range(rnd.randint(40, 160))]
paths = sorted(texts)
bin_paths = ["assets/pack%03d.bin" % i for i in range(pool)]
t0 = 1_600_000_000
for c in range(commits):
    if c == 0:
        touched = paths
    else:
        touched = rnd.sample(paths, min(edits, len(paths)))
    mods = []
    for p in touched:
        ls = texts[p]
        if c:
            for _ in range(rnd.randint(1, 6)):
                j = rnd.randrange(len(ls) + 1)
                op = rnd.random()
                if op < 0.5 and ls:
                    ls[min(j, len(ls) - 1)] = line()
                elif op < 0.8:
                    ls.insert(j, line())
                elif len(ls) > 10:
                    del ls[min(j, len(ls) - 1)]
        mods.append((p, "".join(ls).encode()))
    for p in (bin_paths[(c * bins + k) % pool] for k in range(bins)):
        mods.append((p, rnd.randbytes(bin_kb * 1024)))
    out.write(b"commit refs/heads/main\nmark :%d\n" % (c + 1))
    who = rnd.choice(["Ada <ada@example.com>", "Linus <linus@example.com>", "Grace <grace@example.com>"])
    out.write(b"committer %s %d +0000\n" % (who.encode(), t0 + c * 3600))
    msg = ("change %d: %s\n" % (c, " ".join(rnd.choice(words) for _ in range(8)))).encode()
    out.write(b"data %d\n%s\n" % (len(msg), msg))
    for p, data in mods:
        out.write(b"M 100644 inline %s\n" % p.encode())
        out.write(b"data %d\n" % len(data)); out.write(data); out.write(b"\n")
    if c and c % 50 == 0:
        out.write(b"reset refs/tags/v0.%d\nfrom :%d\n\n" % (c // 50, c + 1))
    if c == commits * 3 // 4:
        out.write(b"reset refs/heads/release\nfrom :%d\n\n" % (c + 1))
out.write(b"done\n")
PY
  # One pack with fresh deltas, as a forge's housekeeping leaves it (bare: with a bitmap).
  git -C "$dir" repack -adf -q --window=10 --depth=50
  git -C "$dir" pack-refs --all
  touch "$dir/.bench-done-v$GEN_VERSION"
}
gen_repo big 400 3000 25 2 300 120
gen_repo mid 150 800 15 1 120 30
pack_mb() { du -cm "$CACHE/repos/$1.git"/objects/pack/*.pack | tail -1 | cut -f1; }
BIG_MB=$(pack_mb big); MID_MB=$(pack_mb mid)
BIG_OBJS=$(git -C "$CACHE/repos/big.git" count-objects -v | awk '/in-pack/ {print $2}')
log "repositories: big.git pack ${BIG_MB} MB (${BIG_OBJS} objects, $(git -C "$CACHE/repos/big.git" rev-list --count main) commits), mid.git pack ${MID_MB} MB"
[ "$BIG_MB" -ge 200 ] || { echo "big.git pack is only $BIG_MB MB (< 200)" >&2; exit 1; }
[ "$ONLY" = prepare ] && exit 0
BIG_HEAD=$(git -C "$CACHE/repos/big.git" rev-parse main)
MID_HEAD=$(git -C "$CACHE/repos/mid.git" rev-parse main)

# --------------------------------------------------------------------- sites and links ---
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P_PORT=$(free_port); P_ADMIN=$(free_port); S_PORT=$(free_port); S_ADMIN=$(free_port)
R_SITES=$(free_port); R_FAST=$(free_port); R_SLOW=$(free_port); NG_PORT=$(free_port); G_PORT=$(free_port)
NG2_PORT=$(free_port)

cd "$WORK"
mkdir -p primary/state primary/data/repositories/bench primary/data/lfs-objects \
         secondary/state secondary/data keys gcp-cache tmp clones
chmod 700 keys
cp -a "$CACHE/repos/big.git" "$CACHE/repos/mid.git" primary/data/repositories/bench/
"$SIDECAR" keygen --out keys/paris.key > keys/paris.pub
"$SIDECAR" keygen --out keys/tokyo.key > keys/tokyo.pub
echo geoforge | "$SIDECAR" hash-password --user demo > keys/users
chmod 600 keys/users

REPLICABLES='replicables:
  - { name: repositories, type: repository, sourcePath: repositories, include: ["**/*.git"] }'
cat > primary/sidecar.yaml <<YAML
siteId: paris
role: primary
externalUrl: http://127.0.0.1:$P_PORT
allowInsecure: true
listen: { service: "127.0.0.1:$P_PORT", admin: "127.0.0.1:$P_ADMIN" }
stateDir: $WORK/primary/state
storageRoot: $WORK/primary/data
keys:
  kid: paris.1
  privateKeyFile: $WORK/keys/paris.key
  trusted:
    - { kid: tokyo.1, publicKey: $(cat keys/tokyo.pub) }
forge:
  embedded: { credentialsFile: $WORK/keys/users, anonymousRead: true }
geo: { rescanInterval: 5s }
$REPLICABLES
YAML
cat > secondary/sidecar.yaml <<YAML
siteId: tokyo
role: secondary
externalUrl: http://127.0.0.1:$S_PORT
primaryExternalUrl: http://127.0.0.1:$R_SITES
allowInsecure: true
listen: { service: "127.0.0.1:$S_PORT", admin: "127.0.0.1:$S_ADMIN" }
stateDir: $WORK/secondary/state
storageRoot: $WORK/secondary/data
primary: { staticUrl: "http://127.0.0.1:$R_SITES" }
keys:
  kid: tokyo.1
  privateKeyFile: $WORK/keys/tokyo.key
  trusted:
    - { kid: paris.1, publicKey: $(cat keys/paris.pub) }
$REPLICABLES
YAML
"$SIDECAR" check --config primary/sidecar.yaml >/dev/null
"$SIDECAR" check --config secondary/sidecar.yaml >/dev/null

# The relay gets a little scheduling priority when we may raise it (root), so that a busy
# machine delays its timers less; it uses little CPU.
NICE=(); [ "$(id -u)" -eq 0 ] && NICE=(nice -n -10)
relay() { # name listen-port rate
  "${NICE[@]}" python3 "$BENCH/wan_relay.py" --listen "127.0.0.1:$2" --target "127.0.0.1:$P_PORT" \
    --delay-ms "$DELAY_MS" --rate-mbit "$3" --stats 2> "relay-$1.log" & PIDS+=($!)
}
wait_http() { # url what pid
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null && break
    sleep 0.1
  done
  echo "$2 did not come up ($1)" >&2; return 1
}
wait_port() { # port what
  for _ in $(seq 1 100); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$2 did not listen on $1" >&2; return 1
}

log "starting primary :$P_PORT, relays (sites :$R_SITES, direct :$R_FAST at $RATE_MBIT Mbit/s, :$R_SLOW at $SLOW_MBIT Mbit/s; ${DELAY_MS} ms each way)"
"$SIDECAR" --config primary/sidecar.yaml 2> primary/sidecar.log & PIDS+=($!); P_PID=$!
relay sites "$R_SITES" "$RATE_MBIT"
relay fast "$R_FAST" "$RATE_MBIT"
relay slow "$R_SLOW" "$SLOW_MBIT"
wait_http "http://127.0.0.1:$P_ADMIN/-/health" primary "$P_PID"
for p in "$R_SITES" "$R_FAST" "$R_SLOW"; do wait_port "$p" relay; done
T_SYNC0=$(date +%s.%N)
"$SIDECAR" --config secondary/sidecar.yaml 2> secondary/sidecar.log & PIDS+=($!); S_PID=$!
wait_http "http://127.0.0.1:$S_ADMIN/-/health" secondary "$S_PID"

# The limit: git http-backend behind nginx + fcgiwrap over the primary's repositories.
# (its own process group, so that the cleanup can stop the preforked children too)
setsid "$FCGIWRAP" -c $((STORM + 4)) -s "unix:$WORK/fcgiwrap.sock" 2> fcgiwrap.log & FCGI_PID=$!
# Its socket exists once it runs, so setsid has made its group by then.
for _ in $(seq 1 100); do [ -S "$WORK/fcgiwrap.sock" ] && break; sleep 0.1; done
[ -S "$WORK/fcgiwrap.sock" ] || { echo "fcgiwrap did not listen" >&2; exit 1; }
FCGI_PGID=$(ps -o pgid= -p "$FCGI_PID" | tr -d ' ' || true)
[ "$FCGI_PGID" = "$FCGI_PID" ] || FCGI_PGID=""   # a group of its own, never the script's
cat > nginx.conf <<EOF
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
user root;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/tmp/body; proxy_temp_path $WORK/tmp/proxy;
  fastcgi_temp_path $WORK/tmp/fcgi; uwsgi_temp_path $WORK/tmp/uwsgi; scgi_temp_path $WORK/tmp/scgi;
  server {
    listen 127.0.0.1:$NG_PORT;
    client_max_body_size 0;
    location / {
      include /etc/nginx/fastcgi_params;
      fastcgi_pass unix:$WORK/fcgiwrap.sock;
      fastcgi_param SCRIPT_FILENAME $HTTP_BACKEND;
      fastcgi_param GIT_PROJECT_ROOT $WORK/primary/data/repositories;
      fastcgi_param GIT_HTTP_EXPORT_ALL "";
      fastcgi_param PATH_INFO \$uri;
      fastcgi_buffering off;
      fastcgi_read_timeout 900s;
    }
  }
  # Diagnostic (overhead phase): the same http-backend over the secondary's replica.
  server {
    listen 127.0.0.1:$NG2_PORT;
    client_max_body_size 0;
    location / {
      include /etc/nginx/fastcgi_params;
      fastcgi_pass unix:$WORK/fcgiwrap.sock;
      fastcgi_param SCRIPT_FILENAME $HTTP_BACKEND;
      fastcgi_param GIT_PROJECT_ROOT $WORK/secondary/data/repositories;
      fastcgi_param GIT_HTTP_EXPORT_ALL "";
      fastcgi_param PATH_INFO \$uri;
      fastcgi_buffering off;
      fastcgi_read_timeout 900s;
    }
  }
}
EOF
"$NGINX" -c "$WORK/nginx.conf" -p "$WORK" -g 'daemon off;' 2>> nginx-error.log & PIDS+=($!)
wait_port "$NG_PORT" nginx

# The peer: git-cache-proxy beside the secondary, in front of the primary through the same
# kind of link as the secondary's (its own relay process would be equivalent; it shares the
# sites link, idle once the secondary has synced). Defaults otherwise (fetch TTL 10 s).
if [ -z "$PEER_ERR" ]; then
  "$GCP" --help > "$OUT/gcp-help.txt" 2>&1 || true
  "$GCP" --bind "127.0.0.1:$G_PORT" --upstream "http://127.0.0.1:$R_SITES" \
    --cache-root "$WORK/gcp-cache" > gcp.log 2>&1 & PIDS+=($!); G_PID=$!
  if ! wait_http "http://127.0.0.1:$G_PORT/healthz" git-cache-proxy "$G_PID"; then
    PEER_ERR="git-cache-proxy did not start: $(tail -n 3 gcp.log | tr '\n' ' ')"
    log "$PEER_ERR"
  fi
fi

# -------------------------------------------------------------- wait for the replica ---
metric() { # admin-port name label-substring → value (0 when absent)
  { curl -fsS "http://127.0.0.1:$1/-/metrics" 2>/dev/null || true; } \
    | awk -v n="$2{" -v l="$3" 'index($0, n) == 1 && index($0, l) { v = $NF } END { print v + 0 }'
}
log "waiting for the secondary to sync both repositories through the ${RATE_MBIT} Mbit/s link"
synced=0
for _ in $(seq 1 900); do
  synced=$(metric "$S_ADMIN" geo_replicable_synced 'replicable="repositories"')
  [ "${synced%.*}" -ge 2 ] && break
  kill -0 "$S_PID" 2>/dev/null || { echo "secondary exited" >&2; tail -5 secondary/sidecar.log >&2; exit 1; }
  sleep 1
done
[ "${synced%.*}" -ge 2 ] || { echo "secondary did not sync within 900 s (synced=$synced)" >&2; exit 1; }
SYNC_S=$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $T_SYNC0 }")
log "secondary synced 2 repositories in ${SYNC_S} s (from its start)"
echo -e "sync\tsecondary_initial_sync_s\t$SYNC_S" >> "$RESULTS"

# ------------------------------------------------------------------------ measurement ---
export GIT_TERMINAL_PROMPT=0 GIT_ASKPASS=/bin/false
served() { metric "$S_ADMIN" geo_accel_served_locally_total 'route="git_upload_pack"'; }
n=0
clone_once() { # url expected-head → seconds on stdout; 1 on failure
  n=$((n + 1))
  local dest="$WORK/clones/c$n" t0 t1
  t0=$(date +%s.%N)
  if ! timeout "$CLONE_TIMEOUT" git -c protocol.version=2 -c credential.helper= clone --bare -q "$1" "$dest" 2> "$WORK/clones/c$n.err"; then
    log "clone of $1 failed: $(tail -n 3 "$WORK/clones/c$n.err" | tr '\n' ' ')"; rm -rf "$dest"; return 1
  fi
  t1=$(date +%s.%N)
  local head; head=$(git -C "$dest" rev-parse main 2>/dev/null || echo none)
  rm -rf "$dest"
  [ "$head" = "$2" ] || { log "clone of $1 has main=$head, expected $2"; return 1; }
  awk "BEGIN { printf \"%.2f\", $t1 - $t0 }"
}
timed() { # label url expected-head [accel]
  local before after s
  before=$(served)
  if s=$(clone_once "$2" "$3"); then
    after=$(served)
    local note=""
    if [ "${4:-}" = accel ]; then
      if [ "${after%.*}" -gt "${before%.*}" ]; then note=local; else note=NOT_ACCELERATED; fi
    fi
    echo -e "$1\t$s\t$note" >> "$RESULTS"
    log "$1: ${s} s ${note}"
  else
    echo -e "$1\tFAILED\t" >> "$RESULTS"
  fi
}

URL_ACCEL="http://127.0.0.1:$S_PORT/bench"
URL_LOCAL="http://127.0.0.1:$NG_PORT/bench"
URL_PEER="http://127.0.0.1:$G_PORT/bench"
URL_FAST="http://127.0.0.1:$R_FAST/bench"
URL_SLOW="http://127.0.0.1:$R_SLOW/bench"

if [ "$ONLY" = all ] || [ "$ONLY" = big ]; then
  log "warm-up (untimed): one clone each from the local http-backend and via the secondary; the peer's first (cold) clone is timed apart"
  clone_once "$URL_LOCAL/big.git" "$BIG_HEAD" >/dev/null || true
  clone_once "$URL_ACCEL/big.git" "$BIG_HEAD" >/dev/null || true
  if [ -z "$PEER_ERR" ]; then timed peer_cold_big "$URL_PEER/big.git" "$BIG_HEAD"; fi
  # Interleaved rounds, so that load from elsewhere on the machine hits all three alike.
  for r in $(seq 1 "$RUNS"); do
    timed local_big "$URL_LOCAL/big.git" "$BIG_HEAD"
    timed accel_big "$URL_ACCEL/big.git" "$BIG_HEAD" accel
    if [ -z "$PEER_ERR" ]; then timed peer_warm_big "$URL_PEER/big.git" "$BIG_HEAD"; fi
  done
  for r in $(seq 1 "$RUNS"); do timed direct_fast_big "$URL_FAST/big.git" "$BIG_HEAD"; done
  for r in $(seq 1 "$RUNS_SLOW"); do timed direct_slow_big "$URL_SLOW/big.git" "$BIG_HEAD"; done
fi

storm() { # label url-base expected-head
  local dir="$WORK/storm-$1" t0 t1 i pids=()
  mkdir -p "$dir"
  local before; before=$(served)
  t0=$(date +%s.%N)
  for i in $(seq 1 "$STORM"); do
    (
      a=$(date +%s.%N)
      if timeout "$CLONE_TIMEOUT" git -c protocol.version=2 -c credential.helper= clone --bare -q "$2/mid.git" "$dir/c$i" 2> "$dir/c$i.err" \
         && [ "$(git -C "$dir/c$i" rev-parse main)" = "$3" ]; then
        b=$(date +%s.%N); awk "BEGIN { printf \"%.2f\n\", $b - $a }" > "$dir/t$i"
      else
        echo FAILED > "$dir/t$i"
      fi
    ) & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  t1=$(date +%s.%N)
  local after; after=$(served)
  local total; total=$(awk "BEGIN { printf \"%.2f\", $t1 - $t0 }")
  local failed; failed=$(cat "$dir"/t* | grep -c FAILED || true)
  local stats; stats=$(cat "$dir"/t* | { grep -v FAILED || true; } | sort -n | awk '{ a[NR] = $1 } END { if (NR) printf "%.2f\t%.2f", a[int((NR + 1) / 2)], a[NR]; else printf "-\t-" }')
  echo -e "storm_$1\t$total\t$stats\t$failed\t$(( ${after%.*} - ${before%.*} ))" >> "$RESULTS"
  log "storm $1: $STORM clones in ${total} s (p50/max per clone: $(echo "$stats" | tr '\t' /) s; failed $failed; served locally by the secondary meanwhile: $(( ${after%.*} - ${before%.*} )))"
  [ "$failed" = 0 ] || { grep -h . "$dir"/c*.err | sort | uniq -c | head -5 >&2; }
  rm -rf "$dir"
}

if [ "$ONLY" = all ] || [ "$ONLY" = storm ]; then
  log "clone storm: $STORM concurrent clones of mid.git (${MID_MB} MB pack)"
  clone_once "$URL_ACCEL/mid.git" "$MID_HEAD" >/dev/null || true
  clone_once "$URL_LOCAL/mid.git" "$MID_HEAD" >/dev/null || true
  if [ -z "$PEER_ERR" ]; then clone_once "$URL_PEER/mid.git" "$MID_HEAD" >/dev/null || true; fi
  storm secondary "$URL_ACCEL" "$MID_HEAD"
  storm local "$URL_LOCAL" "$MID_HEAD"
  if [ -z "$PEER_ERR" ]; then storm peer "$URL_PEER" "$MID_HEAD"; fi
fi

# Where the accelerated clone's extra time goes: the authorization round trips to the
# primary (protocol v2: GET info/refs + POST ls-refs, both through the link), timed as
# `git ls-remote`, and the replica's layout (served by the same http-backend as the limit).
if [ "$ONLY" = all ] || [ "$ONLY" = overhead ]; then
  log "overhead: git ls-remote (v2) x5 via each path; clones of the replica by http-backend"
  lsr() { # label url
    local i a b
    for i in 1 2 3 4 5; do
      a=$(date +%s.%N)
      if timeout 60 git -c protocol.version=2 ls-remote "$2/big.git" refs/heads/main > /dev/null 2>&1; then
        b=$(date +%s.%N); echo -e "$1_lsremote\t$(awk "BEGIN { printf \"%.3f\", $b - $a }")\t" >> "$RESULTS"
      else
        echo -e "$1_lsremote\tFAILED\t" >> "$RESULTS"
      fi
    done
  }
  lsr local "$URL_LOCAL"; lsr accel "$URL_ACCEL"
  if [ -z "$PEER_ERR" ]; then lsr peer "$URL_PEER"; fi
  lsr direct_fast "$URL_FAST"
  if [ -d "$WORK/secondary/data/repositories/bench/big.git" ]; then
    git -C "$WORK/secondary/data/repositories/bench/big.git" count-objects -v > "$OUT/replica-count-objects.txt" 2>&1 || true
    ls -la "$WORK/secondary/data/repositories/bench/big.git/objects/pack" > "$OUT/replica-packs.txt" 2>&1 || true
    for r in $(seq 1 "$RUNS"); do
      timed local_big_o "$URL_LOCAL/big.git" "$BIG_HEAD"
      timed replica_httpbackend_big_o "http://127.0.0.1:$NG2_PORT/bench/big.git" "$BIG_HEAD"
      timed accel_big_o "$URL_ACCEL/big.git" "$BIG_HEAD" accel
    done
  else
    log "replica not at $WORK/secondary/data/repositories/bench/big.git: replica row skipped"
  fi
fi

# -------------------------------------------------------------------------- summary ---
curl -fsS "http://127.0.0.1:$S_ADMIN/-/metrics" > "$OUT/secondary-metrics.txt" 2>/dev/null || true
if [ -z "$PEER_ERR" ]; then curl -fsS "http://127.0.0.1:$G_PORT/metrics" > "$OUT/gcp-metrics.txt" 2>/dev/null || true; fi
{
  echo -e "machine\tnproc=$(nproc)\tcpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo -e "machine\tgit=$(git --version | cut -d' ' -f3)\tpeer=$PEER_VERSION\tload=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo -e "repos\tbig_pack_mb=$BIG_MB\tbig_objects=$BIG_OBJS\tmid_pack_mb=$MID_MB"
  if [ -n "$PEER_ERR" ]; then echo -e "peer_error\t$PEER_ERR"; fi
} >> "$RESULTS"
python3 - "$RESULTS" <<'PY' | tee "$OUT/summary.txt"
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
runs = {}
for r in rows:
    if r[0].endswith(("_big", "_big_o", "_lsremote")):
        runs.setdefault(r[0], []).append(r[1:])
med = {}
for k, v in runs.items():
    ok = [float(x[0]) for x in v if x[0] != "FAILED"]
    notes = sorted({x[1] for x in v if len(x) > 1 and x[1]})
    med[k] = statistics.median(ok) if ok else None
    print("RESULT %s runs=%s median=%s notes=%s" % (k, ",".join(x[0] for x in v),
          "%.2f" % med[k] if ok else "-", ",".join(notes) or "-"))
a = med.get("accel_big")
for peer in ("local_big", "peer_warm_big", "direct_fast_big", "direct_slow_big"):
    if a and med.get(peer):
        print("RESULT ratio accel/%s = %.2f" % (peer, a / med[peer]))
for x, y in (("accel_big_o", "local_big_o"), ("replica_httpbackend_big_o", "local_big_o"),
             ("accel_big_o", "replica_httpbackend_big_o")):
    if med.get(x) and med.get(y):
        print("RESULT ratio %s/%s = %.2f" % (x, y, med[x] / med[y]))
for r in rows:
    if not r[0].endswith(("_big", "_big_o", "_lsremote")):
        print("RESULT " + " ".join(r))
PY
log "results in $OUT"
