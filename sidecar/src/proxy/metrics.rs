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
/// Latency samples a thread keeps before adding them to the shared histogram on its own.
const MAX_PENDING_SAMPLES: usize = 8192;

/// What a thread has counted and not yet added to the shared metrics: (metrics set id,
/// labels, the shared metric, the pending tally).
struct Tally {
    requests: Vec<(u64, RequestLabels, Counter, u64)>,
    latency: Vec<(u64, TargetLabels, Histogram, Vec<f64>)>,
    /// This thread adds its tallies in batches ([`batch_on_this_thread`]); other threads add
    /// each request as it is counted.
    batched: bool,
}

thread_local! {
    static TALLY: RefCell<Tally> = const {
        RefCell::new(Tally { requests: Vec::new(), latency: Vec::new(), batched: false })
    };
}

/// Makes this thread (an I/O thread) count requests locally and add them to the shared
/// metrics in [`flush_thread`], which the thread then calls every 100 ms: the shared counter
/// and histogram are an atomic and a lock that every I/O thread would otherwise write on every
/// request, their cache lines moving between cores each time. A scrape sees requests up to
/// 100 ms late.
pub fn batch_on_this_thread() {
    TALLY.with_borrow_mut(|t| t.batched = true);
}

/// Adds this thread's pending tallies to the shared metrics.
pub fn flush_thread() {
    TALLY.with_borrow_mut(|t| {
        for (_, _, counter, n) in &mut t.requests {
            if *n > 0 {
                counter.inc_by(std::mem::take(n));
            }
        }
        for (_, _, histogram, samples) in &mut t.latency {
            observe_all(histogram, samples);
        }
    })
}

fn observe_all(histogram: &Histogram, samples: &mut Vec<f64>) {
    for s in samples.drain(..) {
        histogram.observe(s);
    }
}

/// Flushes this thread's tallies every 100 ms, for as long as the thread's runtime runs.
pub async fn run_flusher() {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        flush_thread();
    }
}

impl ProxyMetrics {
    /// Counts one service-port request.
    pub fn count_request(&self, labels: RequestLabels) {
        TALLY.with_borrow_mut(|t| {
            let Some(i) = entry(&mut t.requests, self.id, &labels, || {
                self.requests.get_or_create(&labels).clone()
            }) else {
                // rare label sets beyond the list go to the family directly
                self.requests.get_or_create(&labels).inc();
                return;
            };
            let (_, _, counter, pending) = &mut t.requests[i];
            *pending += 1;
            if !t.batched {
                counter.inc_by(std::mem::take(pending));
            }
        })
    }

    /// Observes a service-port request's time to its response head.
    pub fn observe_latency(&self, target: &'static str, seconds: f64) {
        TALLY.with_borrow_mut(|t| {
            let labels = TargetLabels { target };
            let Some(i) = entry(&mut t.latency, self.id, &labels, || {
                self.latency.get_or_create(&labels).clone()
            }) else {
                self.latency.get_or_create(&labels).observe(seconds);
                return;
            };
            let (_, _, histogram, samples) = &mut t.latency[i];
            samples.push(seconds);
            if !t.batched || samples.len() >= MAX_PENDING_SAMPLES {
                observe_all(histogram, samples);
            }
        })
    }
}

/// The index of `labels`' entry in a thread's `list`, added (with the family's metric from
/// `create`: the family's lock and label hashing, once per label set and thread) when new;
/// `None` when the list is full.
fn entry<S: PartialEq + Clone, M, P: Default>(
    list: &mut Vec<(u64, S, M, P)>,
    id: u64,
    labels: &S,
    create: impl FnOnce() -> M,
) -> Option<usize> {
    if let Some(i) = list.iter().position(|(i, l, ..)| *i == id && l == labels) {
        return Some(i);
    }
    if list.len() >= LOCAL_HANDLES {
        return None;
    }
    list.push((id, labels.clone(), create(), P::default()));
    Some(list.len() - 1)
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

    #[test]
    fn a_batching_thread_adds_its_tallies_when_it_flushes() {
        let m = Metrics::new();
        let p = ProxyMetrics::register(&m);
        let labels = RequestLabels {
            route: "other",
            method: "GET",
            code: 200,
            target: "forge",
        };
        let ok = r#"geo_http_requests_total{route="other",method="GET",code="200",target="forge"}"#;
        let count = r#"geo_http_request_duration_seconds_count{target="forge"}"#;
        let p2 = p.clone();
        let m2 = m.clone();
        std::thread::spawn(move || {
            batch_on_this_thread();
            for _ in 0..3 {
                p2.count_request(labels.clone());
                p2.observe_latency("forge", 0.003);
            }
            let before = m2.encode();
            assert!(
                line(&before, ok).is_none_or(|l| l.ends_with(" 0")),
                "{before}"
            );
            flush_thread();
            let after = m2.encode();
            assert_eq!(
                line(&after, ok),
                Some(format!("{ok} 3").as_str()),
                "{after}"
            );
            assert_eq!(line(&after, count), Some(format!("{count} 3").as_str()));
            flush_thread(); // nothing pending: nothing added twice
            assert_eq!(line(&m2.encode(), ok), Some(format!("{ok} 3").as_str()));
        })
        .join()
        .unwrap();
    }
}
