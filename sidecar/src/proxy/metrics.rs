//! Request-path metrics (registered once through [`crate::metrics::Metrics`]).

use crate::metrics::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub code: u16,
    pub target: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub target: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub target: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PollLabels {
    pub result: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// Metrics of the service port.
#[derive(Clone)]
pub struct ProxyMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<TargetLabels, Histogram, fn() -> Histogram>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub connections: Gauge,
}

impl ProxyMetrics {
    pub fn register(m: &Metrics) -> ProxyMetrics {
        let p = ProxyMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            upstream_errors: Family::default(),
            connections: Gauge::default(),
        };
        m.register(
            "geo_http_requests",
            "Service-port requests by route, method, status code and target (local, primary, forge)",
            p.requests.clone(),
        );
        m.register(
            "geo_http_request_duration_seconds",
            "Time to the response head of service-port requests, by target",
            p.latency.clone(),
        );
        m.register(
            "geo_proxy_upstream_errors",
            "Failed upstream requests by target and kind (connect, timeout, io)",
            p.upstream_errors.clone(),
        );
        m.register(
            "geo_http_open_connections",
            "Open client connections on the service port",
            p.connections.clone(),
        );
        p
    }
}

/// Metrics of primary discovery (secondaries).
#[derive(Clone)]
pub struct DiscoveryMetrics {
    pub polls: Family<PollLabels, Counter>,
    /// Seconds since the current config was last confirmed by a successful poll.
    pub config_age: Gauge<f64, AtomicU64>,
}

impl DiscoveryMetrics {
    pub fn register(m: &Metrics) -> DiscoveryMetrics {
        let d = DiscoveryMetrics {
            polls: Family::default(),
            config_age: Gauge::default(),
        };
        m.register(
            "geo_proxy_config_polls",
            "Polls of the internal proxy-config API by result (success, failure)",
            d.polls.clone(),
        );
        m.register(
            "geo_proxy_config_age_seconds",
            "Seconds since the proxy config in use was last confirmed by the internal API",
            d.config_age.clone(),
        );
        d
    }
}
