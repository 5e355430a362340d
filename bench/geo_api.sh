#!/usr/bin/env bash
# Geo API benchmark (issue 4).
#
# - one 1 GiB blob through GET /api/v4/geo/retrieve vs the same file from nginx on loopback
#   (best of 3, MB/s and ratio; goal >= 0.9) and the sidecar's peak RSS (VmHWM; goal <= 64 MiB);
# - long-poll latency: a parked GET /events returns after a hook commits (20 rounds);
# - catalog scan rate over GEO_BENCH_SMALL (default 100000) 1 KiB files vs `sha256sum`
#   over the same files (warm page cache for both), and an unchanged rescan.
#
# Usage: bench/geo_api.sh            (env: GEO_BENCH_DIR=/tmp/geo-bench GEO_BENCH_SMALL=100000)
# Needs: nginx (installed with apt-get when missing), ~2 GiB free under GEO_BENCH_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${GEO_BENCH_DIR:-/tmp/geo-bench}
SMALL=${GEO_BENCH_SMALL:-100000}
mkdir -p "$WORK/big/files" "$WORK/small/files"

if ! command -v nginx >/dev/null; then
  apt-get install -y nginx >/dev/null
fi

BIG="$WORK/big/files/big.bin"
if [ "$(stat -c %s "$BIG" 2>/dev/null || echo 0)" != 1073741824 ]; then
  echo "creating the 1 GiB blob…" >&2
  head -c 1073741824 /dev/urandom > "$BIG"
fi
if [ "$(cat "$WORK/small.count" 2>/dev/null || echo 0)" != "$SMALL" ]; then
  echo "creating $SMALL small files…" >&2
  rm -rf "$WORK/small/files" && mkdir -p "$WORK/small/files"
  python3 - "$WORK/small/files" "$SMALL" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "%02x" % (i % 256))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%07d" % i), "wb") as f:
        f.write(os.urandom(1024))
PY
  echo "$SMALL" > "$WORK/small.count"
fi

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$WORK/nginx.conf" <<CONF
daemon off;
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 64; }
http {
  access_log off;
  sendfile on;
  server { listen 127.0.0.1:$PORT; root $WORK/big; }
}
CONF
nginx -c "$WORK/nginx.conf" -p "$WORK" &
NGINX_PID=$!
trap 'kill $NGINX_PID 2>/dev/null || true' EXIT

cargo build --release -q -p geo-sidecar
cargo test --release -q -p geoforge-tests --test geo_api_bench --no-run
GEO_BENCH_DIR="$WORK" GEO_BENCH_NGINX_PORT="$PORT" \
  cargo test --release -q -p geoforge-tests --test geo_api_bench -- --ignored --nocapture 2>&1 \
  | tee "$WORK/bench.out" | grep '^RESULT' || { cat "$WORK/bench.out"; exit 1; }

# sha256sum over the same small files: one warm-up pass, then timed (1 and 2 processes).
( cd "$WORK/small/files" && find . -type f -print0 | xargs -0 sha256sum >/dev/null )
for P in 1 2; do
  START=$(date +%s.%N)
  ( cd "$WORK/small/files" && find . -type f -print0 | xargs -0 -P "$P" -n 2000 sha256sum >/dev/null )
  END=$(date +%s.%N)
  python3 -c "s=$END-$START; print('RESULT sha256sum_P$P seconds=%.2f files_per_s=%.0f' % (s, $SMALL/s))"
done
echo "RESULT machine nproc=$(nproc) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\""
