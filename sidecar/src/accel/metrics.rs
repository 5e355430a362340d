//! Acceleration metrics: the "% of reads served locally" figure and why requests were proxied.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone)]
pub struct AccelMetrics {
    pub served_local: Family<RouteLabels, Counter>,
    pub proxied: Family<ReasonLabels, Counter>,
    pub queue_wait: Histogram,
}

impl AccelMetrics {
    pub fn register(m: &crate::metrics::Metrics) -> AccelMetrics {
        let a = AccelMetrics {
            served_local: Family::default(),
            proxied: Family::default(),
            queue_wait: Histogram::new(exponential_buckets(0.001, 4.0, 10)),
        };
        m.register(
            "geo_accel_served_locally",
            "Git reads served from the local replica, by route",
            a.served_local.clone(),
        );
        m.register(
            "geo_accel_proxied",
            "Accelerable Git reads proxied to the primary, by reason (no_authorization, want_not_advertised, wants_missing, capability, primary_down, too_large)",
            a.proxied.clone(),
        );
        m.register(
            "geo_accel_upload_pack_queue_wait_seconds",
            "Time local upload-pack requests waited for a slot",
            a.queue_wait.clone(),
        );
        a
    }

    pub fn served_local(&self, route: &str, waited: std::time::Duration) {
        self.served_local
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .inc();
        if route == "git_upload_pack" {
            self.queue_wait.observe(waited.as_secs_f64());
        }
    }

    pub fn proxied(&self, reason: &str) {
        self.proxied
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }
}
