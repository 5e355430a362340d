//! The secondary's replication: registry, workers, verification, status (DESIGN §6).
//! Owner: replication work (issue 5).

use crate::context::{PrimaryWatch, SiteContext};
use std::sync::Arc;

/// Replication of one secondary instance.
pub struct Secondary {
    #[allow(dead_code)]
    ctx: SiteContext,
}

impl Secondary {
    /// Opens the registry and starts the event consumer, backfill, sync and verification workers.
    pub async fn start(ctx: SiteContext, _primary: PrimaryWatch) -> anyhow::Result<Arc<Secondary>> {
        Ok(Arc::new(Secondary { ctx }))
    }

    /// Routes on the admin port (`/-/geo/status`, `/-/geo/confirm-deletes`).
    pub fn admin_routes(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
    }

    /// Queues a sync of one item now (read-your-writes after a relayed push, acceleration misses).
    pub fn request_sync(&self, _replicable: &str, _item_id: &str) {}
}
