//! Wires a sidecar together for its role and serves the service and admin ports until
//! shutdown.

use crate::context::SiteContext;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::{primary::Primary, proxy, secondary::Secondary};
use axum::Router;
use axum::routing::get;
use geoforge_crds::geosite::SiteRole;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Runs the sidecar until SIGTERM/SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let instance = settings.config.instance_name();
    let ctx = SiteContext {
        config: Arc::new(settings.config),
        signing_key: Arc::new(settings.signing_key),
        keyring: Arc::new(settings.keyring),
        metrics: Metrics::new(),
        shutdown: shutdown.clone(),
        instance,
    };
    crate::git::check_available()
        .await
        .map_err(anyhow::Error::msg)?;

    let (service, admin_extra) = match ctx.config.role {
        SiteRole::Primary => {
            let primary = Primary::start(ctx.clone()).await?;
            (
                Router::new().merge(primary.geo_api()),
                primary.admin_routes(),
            )
        }
        SiteRole::Secondary => {
            let watch = proxy::discovery::start(&ctx);
            let secondary = Secondary::start(ctx.clone(), watch).await?;
            (Router::new(), secondary.admin_routes())
        }
        SiteRole::Disabled => (Router::new(), Router::new()),
    };

    let metrics = ctx.metrics.clone();
    let admin = Router::new()
        .route("/-/health", get(|| async { "ok\n" }))
        .route("/-/liveness", get(|| async { "ok\n" }))
        .route("/-/readiness", get(|| async { "ok\n" }))
        .route("/-/metrics", get(move || async move { metrics.encode() }))
        .merge(admin_extra);

    let service_listener = tokio::net::TcpListener::bind(&ctx.config.listen.service).await?;
    let admin_listener = tokio::net::TcpListener::bind(&ctx.config.listen.admin).await?;
    tracing::info!(
        site = %ctx.site_id(), role = ctx.config.role.as_str(), instance = %ctx.instance,
        service = %service_listener.local_addr()?, admin = %admin_listener.local_addr()?, "geo-sidecar started"
    );

    let sd = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        sd.cancel();
    });
    let s1 = shutdown.clone();
    let s2 = shutdown.clone();
    let a = axum::serve(service_listener, service)
        .with_graceful_shutdown(async move { s1.cancelled().await });
    let b = axum::serve(admin_listener, admin)
        .with_graceful_shutdown(async move { s2.cancelled().await });
    let (ra, rb) = tokio::join!(a, b);
    ra?;
    rb?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
