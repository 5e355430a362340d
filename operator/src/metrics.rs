//! Prometheus metrics of the operator (served on `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub reason: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Family<ControllerLabels, Histogram>,
    /// Requests this process made to the Kubernetes API server (bench: requests per minute).
    pub api_requests: Counter,
    pub status_fetch_errors: Counter,
    pub status_passes: Counter,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("geoforge_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        let api_requests = Counter::default();
        let status_fetch_errors = Counter::default();
        let status_passes = Counter::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconciliations by reason",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciliations",
            duration.clone(),
        );
        registry.register(
            "kube_api_requests",
            "Requests sent to the Kubernetes API server",
            api_requests.clone(),
        );
        registry.register(
            "status_fetch_errors",
            "Failed reads of a sidecar's /-/geo/status",
            status_fetch_errors.clone(),
        );
        registry.register(
            "status_passes",
            "Status aggregation passes completed",
            status_passes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            api_requests,
            status_fetch_errors,
            status_passes,
            leader,
        }
    }
}

impl Metrics {
    /// Counts a reconcile and returns a guard that records its duration when dropped.
    pub fn reconcile(&self, controller: &str) -> DurationGuard<'_> {
        let labels = ControllerLabels {
            controller: controller.into(),
        };
        self.reconciles.get_or_create(&labels).inc();
        DurationGuard {
            metrics: self,
            labels,
            start: Instant::now(),
        }
    }

    pub fn error(&self, controller: &str, reason: String) {
        self.errors
            .get_or_create(&ErrorLabels {
                controller: controller.into(),
                reason,
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

pub struct DurationGuard<'a> {
    metrics: &'a Metrics,
    labels: ControllerLabels,
    start: Instant,
}

impl Drop for DurationGuard<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reconciles_errors_and_durations() {
        let m = Metrics::default();
        drop(m.reconcile("geosite"));
        m.error("geosite", "conflict".into());
        let text = m.encode();
        assert!(text.contains("geoforge_operator_reconciles_total{controller=\"geosite\"} 1"));
        assert!(text.contains(
            "geoforge_operator_reconcile_errors_total{controller=\"geosite\",reason=\"conflict\"} 1"
        ));
        assert!(text.contains(
            "geoforge_operator_reconcile_duration_seconds_count{controller=\"geosite\"} 1"
        ));
    }
}
