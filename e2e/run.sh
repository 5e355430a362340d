#!/usr/bin/env bash
# End-to-end tests on a real Kubernetes cluster (see e2e/README.md).
#
# Default: create a kind cluster, build the image, load it into kind, install the chart,
# apply a primary and a secondary site (two namespaces, embedded forge) and the replicables,
# publish the sites' keys with `kubectl geo export-site`, then run the #[ignore]d e2e tests
# (`cargo test -p geoforge-e2e -- --ignored`, in two phases: the tests that start their own
# operator before the chart is installed, the plugin_* and stack_* tests after).
#
# With KUBECONFIG set and GEOFORGE_IMAGE given: use that cluster and that image (pulled
# IfNotPresent), skipping the kind and build steps.
set -euo pipefail
cd "$(dirname "$0")/.."

RELEASE=${GEOFORGE_RELEASE:-geoforge}
RELEASE_NS=${GEOFORGE_NAMESPACE:-geoforge-system}
PRIMARY=${GEOFORGE_E2E_PRIMARY:-paris}
SECONDARY=${GEOFORGE_E2E_SECONDARY:-tokyo}
PRIMARY_NS=${GEOFORGE_E2E_PRIMARY_NS:-geo-e2e-$PRIMARY}
SECONDARY_NS=${GEOFORGE_E2E_SECONDARY_NS:-geo-e2e-$SECONDARY}
EPHEMERAL=${GEOFORGE_E2E_EPHEMERAL:-lisbon}   # local to the operator, created by a test
CLUSTER=${KIND_CLUSTER_NAME:-geoforge-e2e}
E2E_USER=${GEOFORGE_E2E_USER:-e2e}
E2E_PASSWORD=${GEOFORGE_E2E_PASSWORD:-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')}
TIMEOUT=${GEOFORGE_E2E_TIMEOUT:-300s}

log() { printf '\n== %s\n' "$*" >&2; }
need() {
  command -v "$1" >/dev/null 2>&1 || { echo "e2e: '$1' is required: $2" >&2; exit 2; }
}

if [ -n "${KUBECONFIG:-}" ] && [ -n "${GEOFORGE_IMAGE:-}" ]; then
  mode=existing
  IMAGE=$GEOFORGE_IMAGE
else
  mode=kind
  IMAGE=${GEOFORGE_IMAGE:-geoforge:e2e}
  if [ -n "${KUBECONFIG:-}" ]; then
    echo "e2e: KUBECONFIG is set but GEOFORGE_IMAGE is not: using a kind cluster" \
         "(set GEOFORGE_IMAGE to test the KUBECONFIG cluster with an image it can pull)" >&2
  fi
  need docker "builds the image (or set KUBECONFIG and GEOFORGE_IMAGE)"
  need kind "creates the cluster (or set KUBECONFIG and GEOFORGE_IMAGE)"
fi
need kubectl "talks to the cluster"
need helm "installs the chart"
need cargo "builds kubectl-geo and runs the tests"

# ---- cluster and image -------------------------------------------------------------------
if [ "$mode" = kind ]; then
  created=0
  if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "kind: creating cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --wait 180s
    created=1
  fi
  kubeconfig=$(mktemp)
  kind get kubeconfig --name "$CLUSTER" >"$kubeconfig"
  export KUBECONFIG=$kubeconfig
  cleanup() {
    rm -f "$kubeconfig"
    if [ "$created" = 1 ] && [ "${KEEP_CLUSTER:-0}" != 1 ]; then
      log "kind: deleting cluster $CLUSTER (KEEP_CLUSTER=1 keeps it)"
      kind delete cluster --name "$CLUSTER" || true
    fi
  }
  trap cleanup EXIT
  log "docker: building $IMAGE"
  docker build -t "$IMAGE" .
  log "kind: loading $IMAGE"
  kind load docker-image "$IMAGE" --name "$CLUSTER"
else
  log "using the cluster of KUBECONFIG ($(kubectl config current-context)) and image $IMAGE"
fi
kubectl version >/dev/null

# repository:tag (a registry host may carry a port: split at the last ':' after the last '/')
repo=$IMAGE
tag=latest
last=${IMAGE##*/}
if [[ "$last" == *:* ]]; then
  tag=${last##*:}
  repo=${IMAGE%:*}
fi

# ---- phase 1: tests that run their own operator ---------------------------------------------
# The operator tests (tests/operator.rs, tests/crds.rs) start geo-operator on this machine,
# watching one namespace each; they run before the chart's operator exists, which would
# reconcile their sites too. Phase 2 (tests named plugin_* and stack_*) needs the stack.
log "phase 1: cargo test -p geoforge-e2e -- --ignored --skip plugin_ --skip stack_"
cargo build -q -p geo-operator --bin geo-operator
phase1=0
cargo test -p geoforge-e2e -- --ignored --skip plugin_ --skip stack_ --test-threads=1 || phase1=$?
if kubectl get geosites -A -o name 2>/dev/null | grep -q .; then
  log "waiting for phase 1's GeoSites to be deleted"
  kubectl wait --for=delete geosites --all -A --timeout="$TIMEOUT"
fi

# ---- chart ---------------------------------------------------------------------------------
log "CRDs and chart ($RELEASE in $RELEASE_NS, local sites $PRIMARY,$SECONDARY)"
# Helm installs crds/ only on the first install: apply them so reruns pick up changes.
kubectl apply --server-side --force-conflicts -f charts/geoforge/crds/
helm upgrade --install "$RELEASE" charts/geoforge \
  --namespace "$RELEASE_NS" --create-namespace \
  --set image.repository="$repo" --set image.tag="$tag" --set image.pullPolicy=IfNotPresent \
  --set "localSites={$PRIMARY,$SECONDARY,$EPHEMERAL}" \
  --set logFormat=text --set statusInterval=5s \
  --wait --timeout "$TIMEOUT"

# ---- sites -----------------------------------------------------------------------------------
log "sites: $PRIMARY (primary, $PRIMARY_NS) and $SECONDARY (secondary, $SECONDARY_NS)"
for ns in "$PRIMARY_NS" "$SECONDARY_NS"; do
  kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -
done
credentials=$(printf '%s\n' "$E2E_PASSWORD" \
  | cargo run -q -p geo-sidecar -- hash-password --user "$E2E_USER")
kubectl -n "$PRIMARY_NS" create secret generic "$PRIMARY-forge-users" \
  --from-literal=credentials="$credentials" --dry-run=client -o yaml | kubectl apply -f -

primary_url="http://$PRIMARY-geo.$PRIMARY_NS.svc:8080"
secondary_url="http://$SECONDARY-geo.$SECONDARY_NS.svc:8080"
kubectl apply -f - <<YAML
apiVersion: geoforge.dev/v1alpha1
kind: GeoSite
metadata:
  name: $PRIMARY
  namespace: $PRIMARY_NS
spec:
  role: primary
  externalUrl: $primary_url
  allowInsecure: true          # in-cluster http between the sites (tests only)
  replicas: 1
  storage:
    repositories: { size: 1Gi }
    state: { size: 256Mi }
  forge:
    embedded:
      credentialsSecret: $PRIMARY-forge-users
---
apiVersion: geoforge.dev/v1alpha1
kind: GeoSite
metadata:
  name: $SECONDARY
  namespace: $SECONDARY_NS
spec:
  role: secondary
  externalUrl: $secondary_url
  allowInsecure: true
  replicas: 1
  storage:
    repositories: { size: 1Gi }
    state: { size: 256Mi }
---
apiVersion: geoforge.dev/v1alpha1
kind: Replicable
metadata:
  name: repositories
  namespace: $PRIMARY_NS
spec:
  type: repository
  sourcePath: repositories
  include: ["**/*.git"]
  verificationInterval: 1m
  concurrency: 2
---
apiVersion: geoforge.dev/v1alpha1
kind: Replicable
metadata:
  name: lfs-objects
  namespace: $PRIMARY_NS
spec:
  type: blob
  sourcePath: lfs-objects
  include: ["**"]
  idTemplate: "{oid:0:2}/{oid:2:2}/{oid}"
  verificationInterval: 1m
YAML

# ---- keys ------------------------------------------------------------------------------------
# Each operator generates its local sites' keys; peers learn them from spec.publicKeys. Here
# both sites are local to one operator, but publish them the way a multi-cluster setup does.
log "keys: waiting for the generated keys, publishing them with kubectl geo export-site"
cargo build -q -p kubectl-geo
geo=target/debug/kubectl-geo
for pair in "$PRIMARY:$PRIMARY_NS" "$SECONDARY:$SECONDARY_NS"; do
  site=${pair%%:*}
  ns=${pair#*:}
  kubectl -n "$ns" wait "geosite/$site" --for=jsonpath='{.status.publicKeys[0].kid}'="$site.1" \
    --timeout="$TIMEOUT"
  "$geo" -n "$ns" export-site "$site" | kubectl apply --server-side --force-conflicts \
    --field-manager=geoforge-e2e -f -
done

log "waiting for the sites' workloads"
kubectl -n "$PRIMARY_NS" rollout status "statefulset/$PRIMARY-geo" --timeout="$TIMEOUT"
kubectl -n "$SECONDARY_NS" rollout status "statefulset/$SECONDARY-geo" --timeout="$TIMEOUT"
"$geo" status

# ---- phase 2: the installed stack --------------------------------------------------------------
log "phase 2: cargo test -p geoforge-e2e -- --ignored plugin_ stack_"
export GEOFORGE_E2E_PRIMARY=$PRIMARY GEOFORGE_E2E_SECONDARY=$SECONDARY
export GEOFORGE_E2E_PRIMARY_NS=$PRIMARY_NS GEOFORGE_E2E_SECONDARY_NS=$SECONDARY_NS
export GEOFORGE_E2E_USER=$E2E_USER GEOFORGE_E2E_PASSWORD=$E2E_PASSWORD
export GEOFORGE_E2E_EPHEMERAL=$EPHEMERAL
export GEOFORGE_NAMESPACE=$RELEASE_NS GEOFORGE_RELEASE=$RELEASE
status=0
cargo test -p geoforge-e2e -- --ignored plugin_ stack_ || status=$?
if [ "$status" != 0 ]; then
  log "tests failed: state for the log"
  "$geo" status || true
  kubectl get geosites,replicables -A -o wide || true
  kubectl -n "$RELEASE_NS" logs -l app.kubernetes.io/component=operator --tail=200 || true
  kubectl -n "$PRIMARY_NS" logs "statefulset/$PRIMARY-geo" --all-containers --tail=100 || true
  kubectl -n "$SECONDARY_NS" logs "statefulset/$SECONDARY-geo" --all-containers --tail=100 || true
  kubectl get events -A --sort-by=.lastTimestamp | tail -50 || true
fi
if [ "$phase1" != 0 ]; then
  log "phase 1 failed (exit $phase1): see its output above"
  [ "$status" = 0 ] && status=$phase1
fi
exit "$status"
