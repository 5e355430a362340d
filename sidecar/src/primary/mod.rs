//! The primary's Geo API: catalog, event log, transfers (DESIGN §4). Owner: Geo API work (issue 4).

use crate::context::{CompletedPush, PushSink, SiteContext};
use std::sync::Arc;

/// The primary's replication source.
pub struct Primary {
    #[allow(dead_code)]
    ctx: SiteContext,
}

impl Primary {
    /// Opens the catalog and event log and starts the rescan loop.
    pub async fn start(ctx: SiteContext) -> anyhow::Result<Arc<Primary>> {
        Ok(Arc::new(Primary { ctx }))
    }

    /// Routes under `/api/v4/geo/` on the service port.
    pub fn geo_api(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
    }

    /// Routes on the admin port (`/-/geo/status`, `/-/geo/confirm-deletes`).
    pub fn admin_routes(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
    }
}

impl PushSink for Primary {
    fn push_completed(&self, _push: CompletedPush) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
