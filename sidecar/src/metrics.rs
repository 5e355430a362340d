//! The Prometheus registry shared by every module (served on the admin port at `/-/metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::{Metric, Registry};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a metric; call once per metric at start-up.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry
            .lock()
            .expect("metrics registry")
            .register(name, help, metric);
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().expect("metrics registry"))
            .expect("encoding to a String does not fail");
        out
    }
}
