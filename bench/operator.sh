#!/usr/bin/env bash
# Operator benchmark (issue 7): 50 GeoSites and 500 Replicables in one namespace, the
# operator (release build) running on this machine against the cluster in KUBECONFIG.
# Prints the operator's peak RSS (goal <= 64 MiB) and its Kubernetes API requests per minute
# at steady state (bounded: no hot loop), from its own counter
# geoforge_operator_kube_api_requests_total.
#
#   KUBECONFIG=~/.kube/config bash bench/operator.sh
#   SITES=50 REPLICABLES=500 STEADY=300 REPLICAS=0 bash bench/operator.sh
#
# Secondaries run REPLICAS sidecar pods each (default 0: the StatefulSets, Services and
# ConfigMaps are all created and kept, but the cluster runs no sidecar pods; the primary runs
# its one pod, which may sit in ImagePullBackOff without affecting the figures). Status reads
# go to a closed local port (--status-base-url), so every pass fails fast, as when sidecars
# are down: the API traffic measured is the operator's own.
set -euo pipefail

SITES=${SITES:-50}
REPLICABLES=${REPLICABLES:-500}
STEADY=${STEADY:-300}
REPLICAS=${REPLICAS:-0}
NS=${NS:-geoforge-bench}
METRICS_PORT=${METRICS_PORT:-18080}
API_PORT=${API_PORT:-18082}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/geoforge-opbench.XXXXXX)
OP_PID=

if [ -z "${KUBECONFIG:-}" ]; then
  echo "bench/operator.sh needs a cluster: set KUBECONFIG" >&2
  exit 2
fi
for tool in kubectl curl cargo; do
  command -v "$tool" >/dev/null || { echo "needs $tool on PATH" >&2; exit 2; }
done

cleanup() {
  [ -n "$OP_PID" ] && kill "$OP_PID" 2>/dev/null || true
  kubectl delete namespace "$NS" --wait=false --ignore-not-found >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "building geo-operator (release)" >&2
cargo build --release -q -p geo-operator --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/geo-operator"

kubectl apply --server-side --force-conflicts -f "$ROOT/crds/" >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd/geosites.geoforge.dev crd/replicables.geoforge.dev >/dev/null
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null

# The manifests: site-00 is the primary, the rest secondaries; every replicable applies to
# every secondary, so each secondary's ConfigMap lists all of them.
LOCAL=""
{
  for i in $(seq 0 $((SITES - 1))); do
    name=$(printf "site-%02d" "$i")
    LOCAL="${LOCAL:+$LOCAL,}$name"
    if [ "$i" -eq 0 ]; then
      cat <<YAML
apiVersion: geoforge.dev/v1alpha1
kind: GeoSite
metadata: {name: $name, namespace: $NS}
spec:
  role: primary
  externalUrl: http://git.$name.bench.test
  allowInsecure: true
  replicas: 1
  forge: {embedded: {}}
---
YAML
    else
      cat <<YAML
apiVersion: geoforge.dev/v1alpha1
kind: GeoSite
metadata: {name: $name, namespace: $NS}
spec:
  role: secondary
  externalUrl: http://git.$name.bench.test
  allowInsecure: true
  replicas: $REPLICAS
---
YAML
    fi
  done
  for i in $(seq 0 $((REPLICABLES - 1))); do
    cat <<YAML
apiVersion: geoforge.dev/v1alpha1
kind: Replicable
metadata: {name: $(printf "rep-%03d" "$i"), namespace: $NS}
spec:
  type: repository
  sourcePath: group-$i
  include: ["**/*.git"]
---
YAML
  done
} > "$WORK/objects.yaml"
kubectl apply --server-side -f "$WORK/objects.yaml" >/dev/null
echo "created $SITES GeoSites and $REPLICABLES Replicables in $NS" >&2

"$BIN" --local-sites "$LOCAL" --namespace "$NS" --leader-election false \
  --metrics-listen "127.0.0.1:$METRICS_PORT" --api-listen "127.0.0.1:$API_PORT" \
  --status-base-url http://127.0.0.1:9 --log-level warn >"$WORK/operator.log" 2>&1 &
OP_PID=$!

metric() {
  curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}

# Startup: wait until every site has been reconciled once (status.observedGeneration set).
start=$(date +%s)
while :; do
  kill -0 "$OP_PID" 2>/dev/null || { echo "the operator exited:" >&2; cat "$WORK/operator.log" >&2; exit 1; }
  done_sites=$(kubectl get gs -n "$NS" -o jsonpath='{range .items[*]}{.status.observedGeneration}{"\n"}{end}' | grep -c . || true)
  [ "$done_sites" -ge "$SITES" ] && break
  [ $(( $(date +%s) - start )) -gt 600 ] && { echo "startup did not finish in 10 minutes ($done_sites/$SITES sites)" >&2; exit 1; }
  sleep 5
done
startup=$(( $(date +%s) - start ))
startup_requests=$(metric geoforge_operator_kube_api_requests_total)
echo "startup: all $SITES sites reconciled in ${startup}s, $startup_requests API requests" >&2

# Steady state: nothing changes for STEADY seconds.
r0=$(metric geoforge_operator_kube_api_requests_total)
c0=$(metric geoforge_operator_reconciles_total)
sleep "$STEADY"
r1=$(metric geoforge_operator_kube_api_requests_total)
c1=$(metric geoforge_operator_reconciles_total)
rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$OP_PID/status")
cur_kib=$(awk '/VmRSS/ {print $2}' "/proc/$OP_PID/status")

per_min=$(awk -v a="$r0" -v b="$r1" -v s="$STEADY" 'BEGIN { printf "%.1f", (b - a) * 60 / s }')
rec_min=$(awk -v a="$c0" -v b="$c1" -v s="$STEADY" 'BEGIN { printf "%.1f", (b - a) * 60 / s }')
peak_mib=$(awk -v k="$rss_kib" 'BEGIN { printf "%.1f", k / 1024 }')
cur_mib=$(awk -v k="$cur_kib" 'BEGIN { printf "%.1f", k / 1024 }')

cat <<OUT
operator benchmark: $SITES GeoSites ($REPLICAS pods per secondary), $REPLICABLES Replicables
  startup (all sites reconciled)   ${startup}s, $startup_requests API requests
  steady state over ${STEADY}s:
    API requests per minute        $per_min
    reconciles per minute          $rec_min
  peak RSS (VmHWM)                 $peak_mib MiB   (goal <= 64 MiB)
  RSS at the end                   $cur_mib MiB
OUT
