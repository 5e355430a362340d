#!/usr/bin/env bash
# geoforge quickstart: a primary (embedded forge with a sample repository) and a secondary,
# replicating, on this machine. Runs until Ctrl-C, then stops both cleanly.
#
#   ./quickstart.sh            # ports 8080/8081 (primary) and 9080/9081 (secondary)
#   QS_DIR=/tmp/qs ./quickstart.sh
set -euo pipefail
cd "$(dirname "$0")"

QS_DIR=${QS_DIR:-"$PWD/target/quickstart"}
P_PORT=${P_PORT:-8080}; P_ADMIN=${P_ADMIN:-8081}
S_PORT=${S_PORT:-9080}; S_ADMIN=${S_ADMIN:-9081}

cargo build -q -p geo-sidecar
BIN="$PWD/target/debug/geo-sidecar"

mkdir -p "$QS_DIR"
cd "$QS_DIR"
mkdir -p primary/state primary/data/repositories primary/data/lfs-objects secondary/state secondary/data keys
chmod 700 keys

[ -f keys/paris.key ] || "$BIN" keygen --out keys/paris.key > keys/paris.pub
[ -f keys/tokyo.key ] || "$BIN" keygen --out keys/tokyo.key > keys/tokyo.pub
PARIS_PUB=$(cat keys/paris.pub); TOKYO_PUB=$(cat keys/tokyo.pub)

# A user for pushes (password "geoforge"); reads are anonymous in the quickstart.
if [ ! -f keys/users ]; then
  echo geoforge | "$BIN" hash-password --user demo > keys/users
  chmod 600 keys/users
fi

# A sample repository on the primary.
if [ ! -d primary/data/repositories/demo/hello.git ]; then
  work=$(mktemp -d)
  git -C "$work" init -q -b main
  echo "Hello from the primary site" > "$work/README.md"
  git -C "$work" add README.md
  git -C "$work" -c user.name=geoforge -c user.email=geoforge@example.com commit -q -m "First commit"
  mkdir -p primary/data/repositories/demo
  git clone -q --bare "$work" primary/data/repositories/demo/hello.git
  rm -rf "$work"
fi

REPLICABLES='replicables:
  - { name: repositories, type: repository, sourcePath: repositories, include: ["**/*.git"] }
  - { name: lfs-objects, type: blob, sourcePath: lfs-objects, include: ["**"], idTemplate: "{oid:0:2}/{oid:2:2}/{oid}" }'

cat > primary/sidecar.yaml <<YAML
siteId: paris
role: primary
externalUrl: http://127.0.0.1:$P_PORT
allowInsecure: true
listen: { service: "127.0.0.1:$P_PORT", admin: "127.0.0.1:$P_ADMIN" }
stateDir: $QS_DIR/primary/state
storageRoot: $QS_DIR/primary/data
keys:
  kid: paris.1
  privateKeyFile: $QS_DIR/keys/paris.key
  trusted:
    - { kid: tokyo.1, publicKey: $TOKYO_PUB }
forge:
  embedded: { credentialsFile: $QS_DIR/keys/users, anonymousRead: true }
geo: { rescanInterval: 5s }
$REPLICABLES
YAML

cat > secondary/sidecar.yaml <<YAML
siteId: tokyo
role: secondary
externalUrl: http://127.0.0.1:$S_PORT
primaryExternalUrl: http://127.0.0.1:$P_PORT
allowInsecure: true
listen: { service: "127.0.0.1:$S_PORT", admin: "127.0.0.1:$S_ADMIN" }
stateDir: $QS_DIR/secondary/state
storageRoot: $QS_DIR/secondary/data
primary: { staticUrl: "http://127.0.0.1:$P_PORT" }
keys:
  kid: tokyo.1
  privateKeyFile: $QS_DIR/keys/tokyo.key
  trusted:
    - { kid: paris.1, publicKey: $PARIS_PUB }
$REPLICABLES
YAML

pids=()
stop() {
  trap - INT TERM
  echo; echo "stopping…"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  echo "stopped. State is kept in $QS_DIR (delete it to start over)."
  exit 0
}
trap stop INT TERM

"$BIN" --config primary/sidecar.yaml 2> primary/sidecar.log & pids+=($!)
"$BIN" --config secondary/sidecar.yaml 2> secondary/sidecar.log & pids+=($!)

# Wait for both admin ports; a site that exits (a port in use, a bad config) stops the quickstart.
for i in 0 1; do
  port=$([ $i = 0 ] && echo $P_ADMIN || echo $S_ADMIN)
  name=$([ $i = 0 ] && echo primary || echo secondary)
  for _ in $(seq 1 200); do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "the $name sidecar exited:" >&2; tail -n 5 "$name/sidecar.log" >&2; stop
    fi
    curl -fsS "http://127.0.0.1:$port/-/health" >/dev/null 2>&1 && break
    sleep 0.1
  done
done

cat <<TXT
geoforge quickstart is running (logs: $QS_DIR/{primary,secondary}/sidecar.log)

  primary   (paris)  http://127.0.0.1:$P_PORT   admin http://127.0.0.1:$P_ADMIN
  secondary (tokyo)  http://127.0.0.1:$S_PORT   admin http://127.0.0.1:$S_ADMIN

Try:
  git clone http://127.0.0.1:$S_PORT/demo/hello.git          # served by the secondary's replica
  cd hello && echo hi >> README.md && git commit -am hi
  git push http://demo:geoforge@127.0.0.1:$S_PORT/demo/hello.git main   # forwarded to the primary
  $BIN status --config $QS_DIR/secondary/sidecar.yaml   # replication status
  curl -s http://127.0.0.1:$S_ADMIN/-/metrics | grep geo_accel        # reads served locally vs proxied

Ctrl-C stops both sites.
TXT
wait
