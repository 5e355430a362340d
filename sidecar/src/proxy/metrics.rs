//! Request-path metrics (registered once through [`crate::metrics::Metrics`]).

use crate::metrics::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Tells this set's handles apart in the per-thread caches.
    id: u64,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<TargetLabels, Histogram, fn() -> Histogram>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub connections: Gauge,
}

impl ProxyMetrics {
    pub fn register(m: &Metrics) -> ProxyMetrics {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let p = ProxyMetrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
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

/// Label sets cached per thread and family.
const LOCAL_HANDLES: usize = 64;

/// A thread's handles: (metrics set id, labels, metric).
type Handles<S, M> = RefCell<Vec<(u64, S, M)>>;

thread_local! {
    static REQUESTS: Handles<RequestLabels, Counter> = const { RefCell::new(Vec::new()) };
    static LATENCY: Handles<TargetLabels, Histogram> = const { RefCell::new(Vec::new()) };
}

/// The metric of `labels` in `family`, through a per-thread list of handles: the family's
/// lock and label hashing are paid once per label set and thread, not once per request.
fn local<
    S: Clone + Eq + std::hash::Hash,
    M: Clone,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
>(
    cache: &'static std::thread::LocalKey<Handles<S, M>>,
    id: u64,
    family: &Family<S, M, C>,
    labels: &S,
) -> M {
    cache.with_borrow_mut(|list| {
        if let Some((_, _, m)) = list.iter().find(|(i, l, _)| *i == id && l == labels) {
            return m.clone();
        }
        let m = family.get_or_create(labels).clone();
        // a short list stays cheap to scan; rare label sets beyond it go to the family
        if list.len() < LOCAL_HANDLES {
            list.push((id, labels.clone(), m.clone()));
        }
        m
    })
}

impl ProxyMetrics {
    /// Counts one service-port request.
    pub fn count_request(&self, labels: RequestLabels) {
        local(&REQUESTS, self.id, &self.requests, &labels).inc();
    }

    /// Observes a service-port request's time to its response head.
    pub fn observe_latency(&self, target: &'static str, seconds: f64) {
        local(&LATENCY, self.id, &self.latency, &TargetLabels { target }).observe(seconds);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn per_thread_handles_count_into_their_own_registry() {
        let (ma, mb) = (Metrics::new(), Metrics::new());
        let (a, b) = (ProxyMetrics::register(&ma), ProxyMetrics::register(&mb));
        let labels = |code| RequestLabels {
            route: "other",
            method: "GET",
            code,
            target: "forge",
        };
        a.count_request(labels(200));
        a.count_request(labels(200));
        a.count_request(labels(404));
        b.count_request(labels(200));
        a.observe_latency("forge", 0.002);
        // from another thread too: its own handles, the same counters
        let a2 = a.clone();
        std::thread::spawn(move || a2.count_request(labels(200)))
            .join()
            .unwrap();
        let (ta, tb) = (ma.encode(), mb.encode());
        let ok = r#"geo_http_requests_total{route="other",method="GET",code="200",target="forge"}"#;
        let nf = r#"geo_http_requests_total{route="other",method="GET",code="404",target="forge"}"#;
        assert_eq!(line(&ta, ok), Some(format!("{ok} 3").as_str()), "{ta}");
        assert_eq!(line(&ta, nf), Some(format!("{nf} 1").as_str()));
        assert_eq!(line(&tb, ok), Some(format!("{ok} 1").as_str()), "{tb}");
        assert!(line(&tb, nf).is_none());
        let count = r#"geo_http_request_duration_seconds_count{target="forge"}"#;
        assert_eq!(
            line(&ta, count),
            Some(format!("{count} 1").as_str()),
            "{ta}"
        );
    }
}
