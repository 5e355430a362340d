//! What every part of a running sidecar shares.

use crate::metrics::Metrics;
use geoforge_crds::auth::{KeyRing, SigningKey};
use geoforge_crds::config::SidecarConfig;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Shared, read-only site context plus the shutdown signal.
#[derive(Clone)]
pub struct SiteContext {
    pub config: Arc<SidecarConfig>,
    pub signing_key: Arc<SigningKey>,
    pub keyring: Arc<KeyRing>,
    pub metrics: Metrics,
    /// Cancelled on SIGTERM/SIGINT: stop background loops, drain requests.
    pub shutdown: CancellationToken,
    /// `<site-id>/<pod-name>`'s pod part.
    pub instance: String,
}

impl SiteContext {
    pub fn site_id(&self) -> &str {
        &self.config.site_id
    }
}

/// The primary's internal URL as last learnt (None: primary unknown). Produced by
/// [`crate::proxy::discovery`] on a secondary; replication pauses while it is None.
pub type PrimaryWatch = tokio::sync::watch::Receiver<Option<String>>;

/// A push the sidecar saw complete: receive-pack's report-status said these refs were updated.
#[derive(Debug, Clone)]
pub struct CompletedPush {
    /// The client URL path of the repository (e.g. `/group/project.git/git-receive-pack`).
    pub url_path: String,
    /// `(refname, status)` lines that report-status marked `ok`.
    pub updated_refs: Vec<String>,
}

/// Receives completed pushes (the primary's event log implements it). The future resolves
/// once the event is durable, so the push can be acknowledged after it.
pub trait PushSink: Send + Sync {
    fn push_completed(&self, push: CompletedPush) -> futures::future::BoxFuture<'_, ()>;
}
