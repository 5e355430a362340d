//! Prometheus metrics of replication (DESIGN §6).

use crate::metrics::Metrics;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

type Labels = Vec<(String, String)>;

fn hist() -> Histogram {
    Histogram::new([
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    ])
}

#[derive(Clone)]
pub struct ReplicationMetrics {
    pub synced: Family<Labels, Gauge>,
    pub failed: Family<Labels, Gauge>,
    pub registry: Family<Labels, Gauge>,
    pub verified: Family<Labels, Gauge>,
    pub verification_failed: Family<Labels, Gauge>,
    pub cursor: Gauge,
    pub last_event_id: Gauge,
    pub lag: Gauge,
    pub sync_duration: Family<Labels, Histogram, fn() -> Histogram>,
}

pub fn labels(replicable: &str) -> Labels {
    vec![("replicable".into(), replicable.into())]
}

impl ReplicationMetrics {
    pub fn register(m: &Metrics) -> ReplicationMetrics {
        let me = ReplicationMetrics {
            synced: Family::default(),
            failed: Family::default(),
            registry: Family::default(),
            verified: Family::default(),
            verification_failed: Family::default(),
            cursor: Gauge::default(),
            last_event_id: Gauge::default(),
            lag: Gauge::default(),
            sync_duration: Family::new_with_constructor(hist as fn() -> Histogram),
        };
        m.register(
            "geo_replicable_synced",
            "Items synced, per replicable",
            me.synced.clone(),
        );
        m.register(
            "geo_replicable_failed",
            "Items whose last sync failed, per replicable",
            me.failed.clone(),
        );
        m.register(
            "geo_replicable_registry",
            "Items in the registry, per replicable",
            me.registry.clone(),
        );
        m.register(
            "geo_replicable_verified",
            "Items verified, per replicable",
            me.verified.clone(),
        );
        m.register(
            "geo_replicable_verification_failed",
            "Items whose verification failed, per replicable",
            me.verification_failed.clone(),
        );
        m.register(
            "geo_cursor_last_event_id",
            "Last event id processed by this instance",
            me.cursor.clone(),
        );
        m.register(
            "geo_last_event_id",
            "Newest event id seen on the primary",
            me.last_event_id.clone(),
        );
        m.register(
            "geo_replication_lag_seconds",
            "Age of the oldest unprocessed event",
            me.lag.clone(),
        );
        m.register(
            "geo_sync_duration_seconds",
            "Duration of item syncs, per replicable",
            me.sync_duration.clone(),
        );
        me
    }
}
